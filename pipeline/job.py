"""What a preprocessing job is: its typed settings, its identity (fingerprints) and its output layout.

`PreprocessSettings` is the job's one schema: the CLI (`pipeline.preprocess`) parses
strings into it and library code reads typed fields from it. The steps of a split
(`pipeline.plan`, `pipeline.workers`, `pipeline.commit`) take it as it is.

The output folder of one split::

    manifest.json            written last; its presence commits the set (`pipeline.manifest`)
    quarantine.jsonl         one line per rejected input
    <split>-NNNNNN.tar       the shards
    _progress/<shard>.json   one record per finished shard: what a rerun of the same plan reuses

A job's identity is the fingerprint of the settings that decide the shards' content
(`PreprocessSettings.content`): a rerun with the same fingerprint finds its own set,
and one with a different fingerprint must not mix with it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Optional

from pipeline import __version__
from pipeline.manifest import FORMAT_VERSION
from pipeline.sources import SOURCES, Source, SourceOptions
from pipeline.sources.base import DEFAULT_READ_AHEAD
from pipeline.storage import CREDENTIALS_IN_URL, redact, redact_url

QUARANTINE = "quarantine.jsonl"
PROGRESS_DIR = "_progress"
STAGING_PREFIX = ".fusmae-shard-"
"""Folders a shard task stages its tar in; on a local output they sit beside the shards."""
S2_PRODUCTS = ("L1C", "L2A")
S2_OFFSETS = ("remove", "keep")
VERIFY_MODES = ("sha256", "size")
MAX_READ_AHEAD = 64
"""Most locations a worker fetches ahead (each a few MB in memory)."""
PROCESS_LOCAL = ("memory://",)
"""URL schemes whose files live inside one process. The job's Ray workers are other processes: they would not
see an input there, and the shards they wrote there would be lost with them (the job used to report success)."""
PROCESS_LOCAL_HINT = ("an in-memory filesystem lives inside one process, and the job reads and writes through Ray "
                      "worker processes, so nothing would reach it or outlive them; use a path, file://, s3:// or gs://")


class PreprocessError(ValueError):
    """A problem with the invocation or the input that stops the job (the message names the option)."""


def default_workers() -> int:
    """Parallel shard tasks when none is asked for: one per CPU, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def progress_path(root: str, name: str) -> str:
    """The progress record of shard ``name`` in the output folder ``root`` (a filesystem path)."""
    return f"{root}/{PROGRESS_DIR}/{name}.json"


@dataclass(frozen=True)
class SourceSpec:
    """Everything a worker needs to rebuild the source (it travels to Ray workers)."""

    name: str
    input_url: str
    options: SourceOptions

    def build(self) -> Source:
        return SOURCES[self.name](self.input_url, self.options)


@dataclass(frozen=True)
class PreprocessSettings:
    """One preprocessing job, one field per CLI option (``--shard-size-mb`` is ``shard_size_mb``)."""

    source: str
    """Archive layout of ``input``: a key of `pipeline.sources.SOURCES`."""
    input: str
    """fsspec URL of the archive root (path, file://, s3://, gs://; not memory://, see `PROCESS_LOCAL`)."""
    output: str
    """fsspec URL of the shard folder (``--split all``: one sub-folder per split)."""
    split: str = "train"
    """The split to process, or 'all'."""
    workers: int = field(default_factory=default_workers)
    """Shard tasks running at once (the embedded Ray instance gets as many CPUs). Not part of the content."""
    shard_size_mb: float = 512.0
    """Target shard size in MiB, from the sources' size estimates (so the same whatever the worker count)."""
    samples_per_shard: int = 100_000
    s2_product: str = "L1C"
    """SSL4EO sources: the S2 product (L1C, 13 bands; L2A, 12 bands)."""
    s2_offset: str = "remove"
    """SSL4EO-S12 v1.1 Zarr: 'remove' the +1000 offset of the S2 values or 'keep' them raw."""
    max_nonfinite_fraction: float = 0.0
    """A sample with more non-finite pixels than this fraction (per modality) is quarantined."""
    max_pair_gap_days: float = 45.0
    """SSL4EO sources: S1/S2 acquisitions paired by date further apart than this (days) are quarantined
    (temporal_mismatch). Generous: the releases pair acquisitions within days of each other."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Extra fsspec options for input and output; credentials here are never printed or written."""
    read_ahead: int = DEFAULT_READ_AHEAD
    """WebDataset releases on an object store: locations a worker fetches ahead on threads (0: none; memory is
    a few MB a location). Raise it for a distant store. Not part of the content."""
    verify_existing: str = "sha256"
    """How a rerun checks a shard an earlier run left before reusing it: 'sha256' or 'size'."""
    overwrite: bool = False
    """Replace a shard set made with different settings (otherwise an error)."""
    force: bool = False
    """Take over the output's lease even when another run's heartbeat is fresh (it is known to be gone)."""
    retry_window_s: float = 900.0
    """How long storage calls retry transient errors (connection trouble, throttling, 5xx) before the job stops."""
    ray_address: Optional[str] = None
    """Ray cluster address; None: $RAY_ADDRESS, else an embedded local instance."""
    progress: bool = True
    """Show a progress bar (``--no-progress`` turns it off)."""
    plan_only: bool = False
    """List and plan every split (inventory tasks on Ray, shard cutting, shards an earlier run left), print what a
    run would do, and write nothing: no shard, lease or manifest."""

    def __post_init__(self) -> None:
        _check_types(self)
        checks = (
            (self.source in SOURCES, f"--source must be one of {', '.join(sorted(SOURCES))}, got {self.source!r}"),
            (bool(self.input), "--input must not be empty"),
            (bool(self.output), "--output must not be empty"),
            (bool(self.split), "--split must not be empty"),
            (self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
            (self.shard_size_mb > 0, f"--shard-size-mb must be > 0, got {self.shard_size_mb}"),
            (self.samples_per_shard >= 1, f"--samples-per-shard must be >= 1, got {self.samples_per_shard}"),
            (self.s2_product in S2_PRODUCTS, f"--s2-product must be one of {', '.join(S2_PRODUCTS)}"),
            (self.s2_offset in S2_OFFSETS, f"--s2-offset must be one of {', '.join(S2_OFFSETS)}"),
            (0.0 <= self.max_nonfinite_fraction <= 1.0, "--max-nonfinite-fraction must be in [0, 1]"),
            (0.0 < self.max_pair_gap_days < float("inf"), "--max-pair-gap-days must be a finite number > 0"),
            (self.verify_existing in VERIFY_MODES, f"--verify-existing must be one of {', '.join(VERIFY_MODES)}"),
            (self.retry_window_s >= 0, f"--retry-window-s must be >= 0, got {self.retry_window_s}"),
            (0 <= self.read_ahead <= MAX_READ_AHEAD,
             f"--read-ahead must be between 0 and {MAX_READ_AHEAD} locations, got {self.read_ahead}"),
            (redact_url(self.input) == self.input, f"--input {redact_url(self.input)}: {CREDENTIALS_IN_URL}"),
            (redact_url(self.output) == self.output, f"--output {redact_url(self.output)}: {CREDENTIALS_IN_URL}"),
            (not self.input.startswith(PROCESS_LOCAL), f"--input {redact_url(self.input)}: {PROCESS_LOCAL_HINT}"),
            (not self.output.startswith(PROCESS_LOCAL), f"--output {redact_url(self.output)}: {PROCESS_LOCAL_HINT}"),
        )
        for ok, message in checks:
            if not ok:
                raise PreprocessError(message)

    def __repr__(self) -> str:  # settings get logged: never with credentials
        shown = {**self.__dict__, "input": redact_url(self.input), "output": redact_url(self.output),
                 "storage_options": redact(self.storage_options)}
        return f"PreprocessSettings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def shard_bytes(self) -> int:
        """The shard size cap in bytes."""
        return int(self.shard_size_mb * 1024 * 1024)

    def content(self, split: str) -> dict[str, Any]:
        """The settings that decide the shards' content of ``split`` (not workers, output or credentials)."""
        return {
            "source": self.source,
            "input": redact_url(self.input.rstrip("/")),
            "split": split,
            "shard_size_mb": self.shard_size_mb,
            "samples_per_shard": self.samples_per_shard,
            "s2_product": self.s2_product,
            "s2_offset": self.s2_offset,
            "max_nonfinite_fraction": self.max_nonfinite_fraction,
            "max_pair_gap_days": self.max_pair_gap_days,
            "format_version": FORMAT_VERSION,
            "pipeline_version": __version__,
        }

    def job_fingerprint(self, split: str) -> str:
        """The identity of this job's shard set of ``split``: the fingerprint of its `content`."""
        return fingerprint(self.content(split))

    def source_options(self) -> SourceOptions:
        return SourceOptions(self.s2_product, self.s2_offset, self.max_nonfinite_fraction, dict(self.storage_options),
                             max_pair_gap_days=self.max_pair_gap_days, read_ahead=self.read_ahead)

    def source_spec(self) -> SourceSpec:
        return SourceSpec(self.source, self.input, self.source_options())


def _check_types(s: PreprocessSettings) -> None:
    """Types first, so that the value checks compare numbers with numbers (settings built in code, not parsed)."""
    for name in ("workers", "samples_per_shard", "read_ahead"):
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise PreprocessError(f"--{name.replace('_', '-')} must be an integer, got {value!r}")
    for name in ("shard_size_mb", "max_nonfinite_fraction", "max_pair_gap_days"):
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, Real):
            raise PreprocessError(f"--{name.replace('_', '-')} must be a number, got {value!r}")
    for name in ("source", "input", "output", "split"):
        if not isinstance(getattr(s, name), str):
            raise PreprocessError(f"--{name} must be a string, got {type(getattr(s, name)).__name__}")
    if not isinstance(s.storage_options, dict):
        raise PreprocessError("--storage-options must be a JSON object, e.g. '{\"anon\": false}'")
