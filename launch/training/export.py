"""The pretrained encoder as files: the Hub-format folder training writes, and the older pair it replaced.

**Hub format** (`export_pretrained`, written at the end of training to ``<checkpoint.dir>/encoder/`` and by
``python -m launch.export`` for any committed checkpoint): ``model.safetensors``, ``README.md`` (the model
card) and ``config.json`` (see `model.hub`), written in that order, each file once and atomically, the
config last: its presence means the folder is complete. ``FusMAEEncoder.from_pretrained(folder)`` loads it,
and so does ``eval.pretrained``.

**Older format** (`export_encoder`, no longer written by training): ``encoder.safetensors`` (the same
weights) + ``encoder_config.json`` (``model``, ``data``, ``step``). `load_encoder` and `read_export_meta`
read both, so exports made before the Hub format keep loading.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from model import FusMAE, FusMAEConfig
from pipeline.manifest import Manifest
from pipeline.storage import put_atomic, read_bytes, redact, redact_url, url_to_fs, write_bytes_atomic

FOLDER = "encoder"
"""Where training writes the Hub folder, under checkpoint.dir (or run.dir without one)."""
HUB_WEIGHTS = "model.safetensors"
HUB_CONFIG = "config.json"
HUB_CARD = "README.md"
WEIGHTS = "encoder.safetensors"
"""The older format's weights (still read)."""
CONFIG = "encoder_config.json"
"""The older format's config (still read)."""


# -- the Hub folder ------------------------------------------------------------------------------


def data_section(manifest: Manifest, image_size: int) -> dict[str, Any]:
    """What config.json says of the inputs and the pretraining data: bands in order, units, no-data,
    the normalisation statistics and the shard set (its fingerprint: `Manifest.fingerprint`)."""
    mods = ("s1", "s2")
    return {
        "s1_bands": manifest.bands("s1"),
        "s2_bands": manifest.bands("s2"),
        "units": {m: manifest.modalities[m].get("units") for m in mods},
        "dtype": {m: manifest.modalities[m].get("dtype") for m in mods},
        "nodata": {m: manifest.modalities[m].get("nodata") for m in mods},
        "normalization": {m: {"mean": list(manifest.stats[m]["mean"]), "std": list(manifest.stats[m]["std"])}
                          for m in mods},
        "image_size": int(image_size),
        "shards": {
            "manifest": redact_url(manifest.url), "split": manifest.split, "samples": manifest.num_samples,
            "fingerprint": manifest.fingerprint, "job_fingerprint": manifest.job_fingerprint,
            "source": redact(manifest.source),
        },
    }


def hub_config(model_cfg: FusMAEConfig, manifest: Manifest, image_size: int, step: int,
               checkpoint: Optional[str] = None, tag: Optional[str] = None, zero_stage: Optional[int] = None,
               evaluation: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The content of config.json (`model.hub` documents it)."""
    from model.hub import FORMAT, FORMAT_VERSION

    training = {"step": int(step), "checkpoint": redact_url(checkpoint) if checkpoint else None, "tag": tag,
                "zero_stage": zero_stage}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": "FusMAEEncoder",
            "model": model_cfg.to_dict(), "data": data_section(manifest, image_size),
            "training": training, "evaluation": list(evaluation)}


def export_pretrained(state: dict[str, torch.Tensor], config: dict[str, Any], url: str,
                      storage_options: Optional[dict[str, Any]] = None) -> str:
    """Write the Hub folder at ``url`` (local or any fsspec URL): weights, card, then config.json.

    The weights are loaded strictly into the `FusMAEEncoder` the config describes first, so a folder that
    is written is one that loads. Returns ``url``."""
    from model.hub import FusMAEEncoder

    fs, root = url_to_fs(url, storage_options or {})
    root = root.rstrip("/")
    encoder = FusMAEEncoder(config)
    encoder.load_encoder_state_dict({k: v.detach().float().cpu() for k, v in state.items()}, strict=True)
    tensors = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, HUB_WEIGHTS)
        save_file(tensors, local, metadata={"format": "pt", "model": "fusmae-encoder"})
        put_atomic(fs, local, f"{root}/{HUB_WEIGHTS}")
    write_bytes_atomic(fs, f"{root}/{HUB_CARD}", encoder.generate_model_card().content.encode())
    write_bytes_atomic(fs, f"{root}/{HUB_CONFIG}", (json.dumps(config, indent=1, sort_keys=True) + "\n").encode())
    return url.rstrip("/")


def evaluation_summary(doc: dict[str, Any], weights_sha256: str, source: str) -> dict[str, Any]:
    """The card's line for one ``launch.eval`` results.json, after checking it evaluated these weights."""
    s = doc.get("settings") or {}
    info = s.get("pretrained_info") or {}
    if "map_macro" not in doc or not info:
        raise ValueError(f"{source}: not a results.json written by launch.eval")
    if info.get("weights_sha256") != weights_sha256:
        theirs = str(info.get("weights_sha256"))[:12]
        raise ValueError(f"{source}: these results are of other weights (sha256 {theirs}…, this export "
                         f"{weights_sha256[:12]}…); evaluate this checkpoint or this export")
    data = (s.get("config") or {}).get("data") or {}
    keys = ("map_macro", "map_micro", "f1", "f1_macro", "num_test_samples")
    return {"protocol": s.get("protocol"), "label_fraction": s.get("label_fraction"), "seed": s.get("seed"),
            "test_manifest": redact_url(str(data.get("test_manifest", "?"))), **{k: doc.get(k) for k in keys}}


# -- reading either format -----------------------------------------------------------------------


def _export_root(fs: Any, path: str) -> tuple[str, str]:
    """(folder, format 'hub' | 'legacy') of an export named by its folder or by its weights file (fs paths)."""
    path = path.rstrip("/")
    if path.endswith(".safetensors"):
        folder, name = path.rsplit("/", 1)
        return folder, "legacy" if name == WEIGHTS else "hub"
    legacy = not fs.exists(f"{path}/{HUB_CONFIG}") and fs.exists(f"{path}/{CONFIG}")
    return path, "legacy" if legacy else "hub"


def read_export_meta(url: str, storage_options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The export's config in one shape for both formats: ``format`` ('hub' | 'legacy'), ``model``,
    ``data``, ``step``, ``manifest`` (the pretraining shards' URL, redacted; None if unknown), and
    ``config`` (the Hub config.json, or None). FileNotFoundError when its config file is missing."""
    fs, path = url_to_fs(url, storage_options or {})
    folder, fmt = _export_root(fs, path)
    name = HUB_CONFIG if fmt == "hub" else CONFIG
    try:
        raw = json.loads(read_bytes(fs, f"{folder}/{name}"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{redact_url(url)}: no {name} beside the weights") from err
    if fmt == "hub":
        from model.hub import model_fields

        fields = model_fields(raw)
        data = raw.get("data") or {}
        return {"format": fmt, "model": fields, "data": data, "step": (raw.get("training") or {}).get("step"),
                "manifest": (data.get("shards") or {}).get("manifest"), "config": raw}
    data = raw.get("data") or {}
    return {"format": fmt, "model": raw.get("model", {}), "data": data, "step": raw.get("step"),
            "manifest": data.get("manifest"), "config": None}


def load_encoder(url: str, storage_options: Optional[dict[str, Any]] = None) -> tuple[FusMAE, dict[str, Any]]:
    """A FusMAE whose encoder holds an export's weights (either format; the decoder left at its
    initialisation), and `read_export_meta`'s description of it."""
    meta = read_export_meta(url, storage_options)
    fs, path = url_to_fs(url, storage_options or {})
    folder, fmt = _export_root(fs, path)
    net = FusMAE(FusMAEConfig(**meta["model"]))
    with tempfile.TemporaryDirectory() as tmp:
        name = HUB_WEIGHTS if fmt == "hub" else WEIGHTS
        local = os.path.join(tmp, name)
        fs.get_file(f"{folder}/{name}", local)
        net.load_encoder_state_dict(load_file(local), strict=True)
    return net, meta


def export_encoder(state: dict[str, torch.Tensor], model_cfg: FusMAEConfig, data_info: dict[str, Any], url: str,
                   storage_options: Optional[dict[str, Any]] = None, extra: Optional[dict[str, Any]] = None) -> str:
    """The older format: ``encoder.safetensors`` then ``encoder_config.json``. Training no longer writes it;
    kept so that tests (and tools that still expect it) can make one."""
    fs, root = url_to_fs(url, storage_options or {})
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state.items()}
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, WEIGHTS)
        save_file(tensors, local, metadata={"format": "pt", "model": "fusmae-encoder"})
        put_atomic(fs, local, f"{root}/{WEIGHTS}")
    meta = {"model": model_cfg.to_dict(), "data": data_info, **(extra or {})}
    write_bytes_atomic(fs, f"{root}/{CONFIG}", json.dumps(meta, indent=1, sort_keys=True).encode())
    return f"{url.rstrip('/')}/{WEIGHTS}"


# -- any committed checkpoint (or an older export) to a Hub folder: `python -m launch.export` ----------------


def read_source(url: str, storage_options: dict[str, Any], staging: str) -> dict[str, Any]:
    """The encoder weights of ``url`` and what config.json needs from it: a checkpoint folder (its
    ``latest``), one ``step-N`` folder (any ZeRO stage; fetched when remote) or an export of either format,
    read by `launch.evaluation.pretrained`'s loaders (the same ones ``eval.pretrained`` uses)."""
    # Imported here: launch.evaluation.pretrained imports this module's format readers.
    from launch.config import ConfigError
    from launch.evaluation import pretrained as pt

    shown = redact_url(url.rstrip("/"))
    kind = pt.locate_pretrained(url, storage_options, label="checkpoint")
    if kind == "export":
        net, meta = load_encoder(url, storage_options)
        return {"state": net.encoder_state_dict(), "model": meta["model"], "step": meta["step"] or 0,
                "manifest": meta["manifest"], "image_size": meta["data"].get("image_size"),
                "checkpoint": (meta["config"] or {}).get("training", {}).get("checkpoint") or shown,
                "tag": None, "zero_stage": None}
    with pt.checkpoint_folder(url, kind, staging, storage_options, label="checkpoint") as (folder, tag):
        client = pt.client_state(folder, tag)
        config = client.get("config") or {}
        if not config.get("model"):
            raise ConfigError(f"checkpoint={shown}: the checkpoint has no model config (client state "
                              "`config.model`); was it written by launch/train.py?")
        fields = pt.read_model_config(config["model"], shown)
        state, stage = pt.consolidate(folder, tag, client)
    net = pt.encoder_only(FusMAE(FusMAEConfig(**fields)))
    pt._load_state(state, net, shown)  # the canonical encoder names, strictly: what evaluation digests
    data = config.get("data") or {}
    return {"state": net.encoder_state_dict(), "model": fields, "step": int(client.get("step", 0)),
            "manifest": data.get("manifest"), "image_size": data.get("image_size"),
            "checkpoint": shown.rsplit("/", 1)[0] if kind == "checkpoint-step" else shown, "tag": tag,
            "zero_stage": stage}


def export_checkpoint(url: str, dest: str, *, results: Sequence[str] = (), manifest: Optional[str] = None,
                      storage_options: Optional[dict[str, Any]] = None, staging: Optional[str] = None,
                      overwrite: bool = False) -> str:
    """Write the Hub folder of the encoder in ``url`` at ``dest``; returns ``dest``.

    ``manifest``: the pretraining shard set (for the band names, statistics and fingerprint) when the
    one the checkpoint names cannot be read; ``results``: ``launch.eval`` results.json files of these
    weights for the card. Errors a user fixes are ConfigError, FileNotFoundError, FileExistsError,
    PermissionError or ValueError, all with credentials redacted."""
    from launch.data.fit import check_model_fits
    from launch.evaluation.pretrained import weights_digest
    from pipeline.manifest import load_manifest
    from pipeline.storage import check_writable

    options = dict(storage_options or {})
    docs = [(_read_json(r, options), redact_url(r)) for r in results]  # cheap mistakes first
    fs, root = url_to_fs(dest, options)
    if fs.exists(f"{root.rstrip('/')}/{HUB_CONFIG}") and not overwrite:
        raise FileExistsError(f"{redact_url(dest)} already holds an exported encoder; pass --overwrite to replace it")
    try:
        check_writable(fs, root.rstrip("/"))  # before reading what may be a large checkpoint
    except PermissionError as err:
        cause = err.__cause__ or err
        raise PermissionError(f"destination is not writable: {redact_url(dest)} ({type(cause).__name__}: "
                              f"{cause})") from cause
    src = read_source(url, options, staging or tempfile.gettempdir())
    model_cfg = FusMAEConfig(**src["model"])
    where = manifest or src["manifest"]
    if not where:
        raise ValueError(f"{redact_url(url)} does not name its pretraining shard set; pass --manifest URL")
    try:
        shards = load_manifest(where, options)
    except (FileNotFoundError, ValueError) as err:
        raise FileNotFoundError(f"the pretraining shard set's manifest cannot be read ({err}); it gives the "
                                "bands, statistics and fingerprint: pass --manifest URL") from err
    check_model_fits(model_cfg, shards, redact_url(url))
    digest = weights_digest(src["state"])
    evaluation = [evaluation_summary(doc, digest, shown) for doc, shown in docs]
    image_size = src["image_size"] or model_cfg.img_size
    config = hub_config(model_cfg, shards, image_size, src["step"], src["checkpoint"], src["tag"],
                        src["zero_stage"], evaluation)
    return export_pretrained(src["state"], config, dest, options)


def _read_json(url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    fs, path = url_to_fs(url, storage_options)
    try:
        return json.loads(read_bytes(fs, path))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"results file not found: {redact_url(url)}") from err
    except ValueError as err:
        raise ValueError(f"{redact_url(url)}: not valid JSON ({err})") from err
