"""The shard-set manifest: the one contract between preprocessing, training and evaluation.

``manifest.json`` sits beside the shards of one split and is written last (its
presence commits the set). Preprocessing builds it (`Manifest.build`), training
and evaluation load it (`load_manifest`); nothing else parses the file.

Fields (JSON keys as written)::

    format, format_version, pipeline_version    "fusmae-webdataset", 1, the writer's version
    fingerprint         sha256 of the settings that determine the content (the job fingerprint)
    split, source       the split name and the source's description (label_classes for labelled sets)
    settings            those settings, credentials redacted
    shards              [{name, samples, bytes, sha256}], in order
    totals              shards, samples, bytes, input_samples, quarantined
    image_size          [H, W] of every stored sample, 10 m pixels
    modalities          s1 / s2: bands (in order), dtype, units, nodata, member, layout
    stats               s1 / s2: per-band mean and population std over valid pixels
    run                 this execution only (time, argv, workers, seconds): the one part that varies
    index               the sample index file beside it (name, bytes, sha256; see `pipeline.index`), if any

A loader state and a feature cache are valid for one *shard list*:
`Manifest.fingerprint` hashes names, sample counts, bytes and sha256 of the
shards, independent of where the set is stored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from pipeline.storage import read_bytes, redact_url, url_to_fs, write_bytes_atomic

MANIFEST = "manifest.json"
FORMAT = "fusmae-webdataset"
FORMAT_VERSION = 1
MODALITIES = ("s1", "s2")


class ManifestError(ValueError):
    """A file that is not a usable shard-set manifest (named in the message)."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    url: str
    """Where the shard is read from: beside the manifest."""
    samples: int
    bytes: int
    sha256: Optional[str]


def shard_list_fingerprint(shards: Sequence[dict[str, Any]]) -> str:
    """sha256 of a shard list (names, sample counts, bytes, sha256), independent of key order and location."""
    canon = [{k: s[k] for k in ("name", "samples", "bytes", "sha256")} for s in shards]
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """One split's shard set, as preprocessing committed it."""

    url: str
    """Where it was loaded from ('' for one just built and not yet written)."""
    split: str
    shards: tuple[ShardInfo, ...]
    """Shards holding at least one sample, in manifest order."""
    image_size: tuple[int, int]
    """(H, W) of every stored sample, 10 m pixels."""
    modalities: dict[str, dict[str, Any]]
    """{'s1'|'s2': {'bands': [...], 'dtype': 'int16', 'nodata': -1000 | 'non-finite', 'units': ...}}."""
    stats: dict[str, Any]
    """{'s1'|'s2': {'mean': [...], 'std': [...], ...}} per band, over valid pixels."""
    source: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    job_fingerprint: str = ""
    """sha256 of the content settings: a rerun with the same settings finds its own set."""
    run: dict[str, Any] = field(default_factory=dict)
    index: Optional[dict[str, Any]] = None
    """The sample index beside the manifest ({name, bytes, sha256}; `pipeline.index`), None when it has none."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Top-level fields this version does not interpret, kept so that a rewrite loses nothing."""

    # -- what readers ask ------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return shard_list_fingerprint([{"name": s.name, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256}
                                       for s in self.shards])

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def bands(self, modality: str) -> list[str]:
        return list(self.modalities[modality]["bands"])

    def shape(self, modality: str) -> tuple[int, int, int]:
        """(bands, H, W) of one sample of ``modality``."""
        return (len(self.modalities[modality]["bands"]), *self.image_size)

    def dtype(self, modality: str) -> np.dtype:
        return np.dtype(self.modalities[modality]["dtype"])

    @property
    def label_classes(self) -> Optional[list[str]]:
        """Class names of a labelled set (``source.label_classes``, in label-vector order); None otherwise."""
        names = self.source.get("label_classes")
        return list(names) if names else None

    @property
    def shown(self) -> str:
        return redact_url(self.url) if self.url else f"<{self.split} manifest>"

    # -- building and writing --------------------------------------------------------------
    @classmethod
    def build(cls, *, split: str, source: dict[str, Any], settings: dict[str, Any], job_fingerprint: str,
              shards: Sequence[dict[str, Any]], input_samples: int, quarantined: int,
              image_size: Sequence[int], modalities: dict[str, dict[str, Any]], stats: dict[str, Any],
              run: Optional[dict[str, Any]] = None, index: Optional[dict[str, Any]] = None) -> "Manifest":
        """The manifest of a finished job: ``shards`` are the published shard records (name, samples,
        bytes, sha256), in order; totals are derived from them."""
        infos = tuple(ShardInfo(s["name"], s["name"], int(s["samples"]), int(s["bytes"]), s["sha256"])
                      for s in shards)
        totals = {"shards": len(infos), "samples": sum(s.samples for s in infos),
                  "bytes": sum(s.bytes for s in infos), "input_samples": int(input_samples),
                  "quarantined": int(quarantined)}
        size = tuple(int(v) for v in image_size) if image_size else (0, 0)
        return cls("", split, infos, size, modalities, stats, source, settings, totals, job_fingerprint, run or {},
                   index)

    def to_dict(self) -> dict[str, Any]:
        """The JSON body; everything but ``run`` is a deterministic function of the job's content."""
        return {
            **self.extra,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "pipeline_version": self.extra.get("pipeline_version", _version()),
            "fingerprint": self.job_fingerprint,
            "split": self.split,
            "source": self.source,
            "settings": self.settings,
            "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256}
                       for s in self.shards],
            "totals": self.totals,
            "quarantined": self.totals.get("quarantined", 0),
            "quarantine_report": self.extra.get("quarantine_report", "quarantine.jsonl"),
            "image_size": list(self.image_size) if any(self.image_size) else None,  # None: every input quarantined
            "modalities": self.modalities,
            "stats": self.stats,
            "run": self.run,
            **({"index": self.index} if self.index else {}),
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n").encode()

    def write(self, url: str, storage_options: Optional[dict[str, Any]] = None) -> str:
        """Write ``<url>/manifest.json`` atomically (the commit of the shard set); returns its URL."""
        fs, root = url_to_fs(url, storage_options)
        write_bytes_atomic(fs, f"{root.rstrip('/')}/{MANIFEST}", self.to_json())
        return f"{url.rstrip('/')}/{MANIFEST}"

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], url: str = "") -> "Manifest":
        """Check and type a manifest body; shard URLs are resolved beside ``url``."""
        shown = redact_url(url) if url else "manifest"
        base = url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."
        try:
            if raw.get("format", FORMAT) != FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
            shards = tuple(ShardInfo(s["name"], f"{base}/{s['name']}", int(s["samples"]), int(s["bytes"]),
                                     s.get("sha256"))
                           for s in raw["shards"] if int(s["samples"]) > 0)
            size = raw["image_size"]
            image_size = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
            modalities = {m: dict(raw["modalities"][m]) for m in MODALITIES}
            stats = {m: dict(raw["stats"][m]) for m in MODALITIES}
            for m in MODALITIES:
                np.dtype(modalities[m]["dtype"])
                if len(stats[m]["mean"]) != len(modalities[m]["bands"]):
                    raise ValueError(f"stats.{m} has {len(stats[m]['mean'])} bands, modalities.{m} "
                                     f"{len(modalities[m]['bands'])}")
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"{shown}: not a fusmae shard manifest ({type(err).__name__}: {err})") from err
        if not shards:
            raise ManifestError(f"{shown}: the manifest lists no samples")
        known = {"format", "format_version", "fingerprint", "split", "source", "settings", "shards", "totals",
                 "quarantined", "image_size", "modalities", "stats", "run", "index"}
        extra = {k: v for k, v in raw.items() if k not in known}
        return cls(url, str(raw.get("split", "")), shards, image_size, modalities, stats,
                   dict(raw.get("source") or {}), dict(raw.get("settings") or {}), dict(raw.get("totals") or {}),
                   str(raw.get("fingerprint", "")), dict(raw.get("run") or {}), raw.get("index"), extra)


def load_manifest(url: str, storage_options: Optional[dict[str, Any]] = None) -> Manifest:
    """Read and check the manifest at ``url`` (a manifest.json, or the folder holding one).

    Raises FileNotFoundError (named, credentials redacted) or ManifestError."""
    fs, path = url_to_fs(url, storage_options)
    if not path.endswith(".json"):
        url, path = f"{url.rstrip('/')}/{MANIFEST}", f"{path.rstrip('/')}/{MANIFEST}"
    try:
        raw = json.loads(read_bytes(fs, path))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"manifest not found: {redact_url(url)}") from err
    except ValueError as err:
        raise ManifestError(f"{redact_url(url)}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ManifestError(f"{redact_url(url)}: not a fusmae shard manifest (a JSON object is expected)")
    return Manifest.from_dict(raw, url)


def read_committed(folder_url: str, storage_options: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
    """The body of the manifest committed in the shard folder ``folder_url``; None where there is none.

    For a writer asking whether its job is already done (it compares ``fingerprint``). Unlike
    `load_manifest` it does not refuse a set without samples (every input quarantined): that is
    still a finished job, which a rerun must recognise. Raises ManifestError for a file that is
    not a JSON object."""
    fs, root = url_to_fs(folder_url, storage_options)
    shown = f"{redact_url(folder_url.rstrip('/'))}/{MANIFEST}"
    try:
        raw = json.loads(read_bytes(fs, f"{root.rstrip('/')}/{MANIFEST}"))
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise ManifestError(f"{shown}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ManifestError(f"{shown}: not a fusmae shard manifest (a JSON object is expected)")
    return raw


def _version() -> str:
    from pipeline import __version__

    return __version__
