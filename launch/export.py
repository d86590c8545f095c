"""Export the encoder of a committed checkpoint as a Hub-format folder.

    python -m launch.export s3://bucket/runs/vit_b s3://bucket/models/fusmae-vit-b --results runs/ben/results.json
    python -m launch.export runs/vit_b/ckpt/step-00020000 exports/vit_b-20k

CHECKPOINT is a training checkpoint folder (its `latest`), one of its step-N folders (any ZeRO stage; remote
ones are fetched and checked first), or an older export (encoder.safetensors or its folder) to convert.
DEST (a folder or any fsspec URL) receives model.safetensors, README.md (the model card) and config.json,
config last; `FusMAEEncoder.from_pretrained(DEST)` loads it, and so does `eval.pretrained=DEST`. See
`launch.training.export`. Exit codes: 0 done, 2 a problem to fix (named in the message).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from typing import Any, Optional, Sequence

from pipeline.logs import setup_logging


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint folder (with `latest`), a step-N folder, or an older export")
    p.add_argument("dest", help="folder or URL (s3://...) to write the Hub-format encoder folder to")
    p.add_argument("--results", action="append", default=[], metavar="RESULTS_JSON",
                   help="a launch.eval results.json of these weights, for the model card (repeatable)")
    p.add_argument("--manifest", default=None,
                   help="the pretraining shard set's manifest, when the one the checkpoint names is not readable")
    p.add_argument("--storage-options", default="{}", metavar="JSON",
                   help="extra fsspec options for every location (credentials: prefer the AWS chain)")
    p.add_argument("--staging", default=None, help="local folder for downloading a remote checkpoint (default: TMPDIR)")
    p.add_argument("--overwrite", action="store_true", help="replace an export already at DEST")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        setup_logging(logging.WARNING)
    except ValueError as err:  # a bad FUSMAE_LIBRARY_LOG_LEVEL
        print(f"error: {err}", file=sys.stderr)
        return 2
    from launch.training.export import export_checkpoint

    options: dict = {}
    urls = [args.checkpoint, args.dest, *(args.results or []), *([args.manifest] if args.manifest else [])]
    try:
        options = json.loads(args.storage_options)
        if not isinstance(options, dict):
            raise ValueError("--storage-options must be a JSON object")
        url = export_checkpoint(args.checkpoint, args.dest, results=args.results, manifest=args.manifest,
                                storage_options=options, staging=args.staging, overwrite=args.overwrite)
    except (ValueError, OSError) as err:  # ConfigError, missing / existing / unwritable locations, bad files
        print(f"error: {redacted(str(err), options, urls)}", file=sys.stderr, flush=True)
        return 2
    except Exception:  # noqa: BLE001 - a bug or an unforeseen failure: the traceback, without credentials
        print(redacted(traceback.format_exc(), options, urls), file=sys.stderr, flush=True)
        return 1
    print(f"exported encoder to {redacted(url, options, urls)}", flush=True)
    return 0


def redacted(text: str, storage_options: dict, urls: Sequence[str] = ()) -> str:
    """``text`` without URL credentials (``user:password@``, also where a library quotes a URL without its
    scheme) or the secret values of ``storage_options``."""
    from pipeline.storage import REDACTED, redact, redact_url

    text = redact_url(text)
    userinfo = [u.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[0] for u in urls if "@" in u and "://" in u]
    for value in [*userinfo, *_secret_values(storage_options, redact(storage_options))]:
        if value:
            text = text.replace(value, REDACTED)
    return text


def _secret_values(raw: Any, masked: Any) -> list[str]:
    """The string values of ``raw`` that `pipeline.storage.redact` masked in ``masked``."""
    if isinstance(raw, dict) and isinstance(masked, dict):
        return [v for k in raw for v in _secret_values(raw[k], masked.get(k))]
    if isinstance(raw, list) and isinstance(masked, list):
        return [v for a, b in zip(raw, masked) for v in _secret_values(a, b)]
    return [raw] if isinstance(raw, str) and raw and raw != masked else []


if __name__ == "__main__":
    sys.exit(main())
