"""What every archive reader provides, and the checks every sample goes through."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from pipeline.shards import Sample
from pipeline.stats import first_other_than, half_nonfinite_count
from pipeline.storage import redact_url, url_to_fs

# Sentinel-2 band orders as stored in the shards (all bands on the 10 m grid).
S2_L1C_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
S2_L2A_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
S1_BANDS = ("VV", "VH")
# Native ground sampling distance of each band, in metres.
S2_RESOLUTION_M = {
    "B1": 60, "B2": 10, "B3": 10, "B4": 10, "B5": 20, "B6": 20, "B7": 20, "B8": 10,
    "B8A": 20, "B9": 60, "B10": 60, "B11": 20, "B12": 20,
}
# Stored S2 value of a pixel without data, in every published layout.
S2_NODATA = 0

# Quarantine reasons (the `reason` field of quarantine.jsonl).
UNREADABLE = "unreadable"
WRONG_SHAPE = "wrong_shape"
WRONG_BAND_COUNT = "wrong_band_count"
MISSING_PARTNER = "missing_partner"
NON_FINITE = "non_finite"
ALL_NODATA = "all_nodata"
MISALIGNED = "misaligned"
BAD_LABELS = "bad_labels"
TEMPORAL_MISMATCH = "temporal_mismatch"
"""S1 and S2 acquisitions paired by date lie more than ``max_pair_gap_days`` apart."""


@dataclass
class WorkItem:
    """One planned sample: where to read it from, decided on the driver before any pixel is read."""

    key: str
    sample_id: str
    time_index: Optional[int]
    refs: dict[str, Any]
    """Source-specific, JSON-serialisable: URLs, array indices, metadata known from the inventory."""
    est_bytes: int
    """Expected size in a shard (used to cut shards by size deterministically)."""


@dataclass
class Rejection:
    """One line of quarantine.jsonl."""

    url: str
    sample_id: Optional[str]
    reason: str
    detail: str = ""
    key: Optional[str] = None
    time_index: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["url"] = redact_url(d["url"])
        return d


DEFAULT_READ_AHEAD = 4
"""Locations a worker reading the Zarr releases from an object store fetches ahead, in batches of that many (the
next once a batch's first location is in, so 4 to 8 in flight), a batch's members or chunks that lie side by side
in one ranged request of up to 8 MB (`pipeline.sources.ranges`), on twice as many threads (a few MB a location:
~3.7 MB at 264 px in `bench/bench_remote_input.py`, which measures the depths; 8 for a distant store)."""


@dataclass
class SourceOptions:
    s2_product: str = "L1C"
    """L1C (13 bands) or L2A (12 bands) for the SSL4EO sources; BigEarthNet is always L2A."""
    s2_offset: str = "remove"
    """SSL4EO-S12 v1.1 Zarr S2 values carry +1000: 'remove' subtracts it (int16, exactly invertible), 'keep' stores raw."""
    max_nonfinite_fraction: float = 0.0
    """A sample with more non-finite pixels than this fraction (per modality) is quarantined."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_pair_gap_days: float = 45.0
    """Sources that pair S1 and S2 acquisitions by date quarantine pairs further apart than this (days)."""
    read_ahead: int = DEFAULT_READ_AHEAD
    """Object-store input of the Zarr releases (WebDataset members, chunk files): locations whose members or chunks a
    worker fetches ahead on threads while it writes the current one, in batches of that many (`DEFAULT_READ_AHEAD`;
    0: none). Speed only: the samples do not depend on it."""


Result = Union[Sample, Rejection]


class Source(ABC):
    """An archive layout: inventory on the driver (`plan`), pixels on the workers (`read`)."""

    name: str = ""
    version: str = ""
    split_names: tuple[str, ...] = ("train",)

    def __init__(self, input_url: str, options: SourceOptions):
        self.input_url = input_url.rstrip("/")
        self.options = options
        self.fs, self.root = url_to_fs(self.input_url, options.storage_options)

    def url(self, path: str) -> str:
        """A full URL for a path of this source's filesystem (for quarantine reports)."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return path if protocol in ("file", "local") else f"{protocol}://{path}"

    @abstractmethod
    def available_splits(self) -> list[str]:
        """Splits present in the input (raises FileNotFoundError with a clear message if none)."""

    @abstractmethod
    def plan(self, split: str, map_fn: Callable[[Callable, Sequence], list]) -> tuple[list[WorkItem], list[Rejection]]:
        """List the samples of ``split`` in their deterministic order.

        ``map_fn(fn, args)`` runs ``fn`` over ``args`` (in parallel on Ray), for
        inventories that need to open files (Zarr metadata).
        """

    @abstractmethod
    def read(self, items: Sequence[WorkItem], split: str) -> Iterator[Result]:
        """Yield one Sample or Rejection per item, in the order of ``items``."""

    @property
    def s1_bands(self) -> tuple[str, ...]:
        """S1 band names in stored order (VV, VH for every release read so far)."""
        return S1_BANDS

    @property
    def s2_bands(self) -> tuple[str, ...]:
        """S2 band names in stored order: the product ``--s2-product`` asks for (a source with one product
        overrides this)."""
        return S2_L1C_BANDS if self.options.s2_product == "L1C" else S2_L2A_BANDS

    def describe(self) -> dict[str, Any]:
        """Source facts recorded in the manifest."""
        return {"name": self.name, "version": self.version, "input": redact_url(self.input_url)}

    def nodata(self) -> dict[str, Any]:
        """No-data convention of the stored values: S1 non-finite, S2 a value (default 0)."""
        return {"s1": "non-finite", "s2": S2_NODATA}

    # -- checks shared by every source -------------------------------------------------------

    def check(self, item: WorkItem, s1: np.ndarray, s2: np.ndarray, url: str) -> Optional[Rejection]:
        """The checks every sample passes before it may reach a shard."""

        def reject(reason: str, detail: str) -> Rejection:
            return Rejection(url, item.sample_id, reason, detail, item.key, item.time_index)

        if s1.ndim != 3 or s1.shape[0] != len(self.s1_bands):
            return reject(WRONG_BAND_COUNT, f"S1 has shape {s1.shape}, expected ({len(self.s1_bands)}, H, W)")
        if s2.ndim != 3 or s2.shape[0] != len(self.s2_bands):
            return reject(WRONG_BAND_COUNT, f"S2 has shape {s2.shape}, expected ({len(self.s2_bands)}, H, W)")
        if s1.shape[1:] != s2.shape[1:]:
            return reject(WRONG_SHAPE, f"S1 grid {s1.shape[1:]} differs from S2 grid {s2.shape[1:]}")
        if min(s1.shape[1:]) == 0:
            return reject(WRONG_SHAPE, f"empty grid {s1.shape[1:]}")
        limit = self.options.max_nonfinite_fraction
        finite = {}
        for name, x in (("S1", s1), ("S2", s2)):
            if np.issubdtype(x.dtype, np.floating):
                finite[name] = count_finite(x)
                bad = 1.0 - finite[name] / x.size
                if bad > limit:
                    return reject(NON_FINITE, f"{name}: {bad:.2%} non-finite pixels (limit {limit:.2%})")
        # S2's valid pixels are those other than its no-data value when it is integer: found at the first such pixel
        integer_nodata = type(self).valid_s2 is Source.valid_s2 and s2.dtype.kind in "iu"
        # S1's valid pixels are its finite ones: counted above when S1 is floating
        if not (finite["S1"] if "S1" in finite and type(self).valid_s1 is Source.valid_s1 else self.valid_s1(s1).any()):
            return reject(ALL_NODATA, "S1 has no valid pixel")
        if not (any_other_than(s2, self.nodata()["s2"]) if integer_nodata else self.valid_s2(s2).any()):
            return reject(ALL_NODATA, "S2 has no valid pixel (all no-data)")
        return None

    def valid_s1(self, s1: np.ndarray) -> np.ndarray:
        return np.isfinite(s1)

    def valid_s2(self, s2: np.ndarray) -> np.ndarray:
        nodata = self.nodata()["s2"]
        valid = s2 != nodata
        if np.issubdtype(s2.dtype, np.floating):
            valid &= np.isfinite(s2)
        return valid


def in_order(bands: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """``bands[order]`` along the first axis: a view where ``order`` is the stored order (a sample then shares its
    reader's array, which nothing changes afterwards), a copy otherwise."""
    if len(order) == bands.shape[0] and all(i == k for k, i in enumerate(order)):
        return bands
    return bands[list(order)]


def count_finite(x: np.ndarray) -> int:
    """How many elements of floating ``x`` are finite. float16 (Sentinel-1 in SSL4EO-S12 v1.1) is read through its
    bits, finite unless every exponent bit is set (IEEE 754 binary16), in one compiled pass
    (`pipeline.stats.half_nonfinite_count`): ~30x faster than numpy's float16 isfinite."""
    if x.dtype.itemsize == 2 and x.dtype.kind == "f":
        bits = np.ascontiguousarray(x).reshape(-1).view(np.dtype(np.uint16).newbyteorder(x.dtype.byteorder))
        return int(x.size - half_nonfinite_count()(bits.astype(np.uint16, copy=False)))
    return int(np.count_nonzero(np.isfinite(x)))


def any_other_than(x: np.ndarray, value: Any) -> bool:
    """``(x != value).any()``: for integers, compiled and stopped at the first such element
    (`pipeline.stats.first_other_than`), so a sample with data costs a pixel, not a mask of every pixel."""
    if x.dtype.kind in "iu" and x.size and isinstance(value, (int, np.integer)):
        info = np.iinfo(x.dtype)
        if not info.min <= value <= info.max:  # no element can hold it
            return True
        flat = np.ascontiguousarray(x).reshape(-1).astype(x.dtype.newbyteorder("="), copy=False)
        return first_other_than()(flat, flat.dtype.type(value)) >= 0  # one type on both sides: compared exactly
    return bool((x != value).any())


def upsample_nearest(band: np.ndarray, factor: int) -> np.ndarray:
    """(h, w) → (h*factor, w*factor) by repeating pixels: exact values, no interpolation."""
    if factor == 1:
        return band
    return np.repeat(np.repeat(band, factor, axis=0), factor, axis=1)


_DATE = re.compile(r"(\d{8}T\d{6})")


def date_from_name(name: str) -> Optional[str]:
    """The first yyyymmddThhmmss in a product name, as ISO 8601 (UTC), or None."""
    m = _DATE.search(name)
    if not m:
        return None
    s = m.group(1)
    return f"{s[0:4]}-{s[4:6]}-{s[6:8]}T{s[9:11]}:{s[11:13]}:{s[13:15]}Z"


def iso_seconds(iso: str) -> np.datetime64:
    """An ISO 8601 UTC time ('2020-05-10T17:40:31Z') as datetime64[s]."""
    return np.datetime64(iso.rstrip("Z"), "s")


def gap_days(a: Optional[str], b: Optional[str]) -> Optional[float]:
    """|a - b| in days (4 decimals) of two ISO 8601 UTC times; None if either is unknown."""
    if a is None or b is None:
        return None
    seconds = abs(int((iso_seconds(a) - iso_seconds(b)) / np.timedelta64(1, "s")))
    return round(seconds / 86400.0, 4)


@dataclass(frozen=True)
class DatePair:
    """One S1/S2 pairing of a location's acquisitions (see `pair_by_date`)."""

    rank: int
    """Date rank of the pair (0 = earliest): the sample's time index."""
    s1: Optional[int]
    """Index of the S1 acquisition as stored, None when S2 has more acquisitions than S1."""
    s2: Optional[int]
    """Index of the S2 acquisition as stored, None when S1 has more acquisitions than S2."""
    gap_days: Optional[float]
    """|t(S1) - t(S2)| in days, None when either is undated."""


def pair_by_date(s1_times: Sequence[Optional[str]], s2_times: Sequence[Optional[str]]) -> list[DatePair]:
    """Pair a location's S1 and S2 acquisitions (ISO times, in stored order) by acquisition date.

    The k-th S1 in date order goes with the k-th S2 in date order: for two sequences of equal
    length this is the one-to-one pairing with the least total gap (matching sorted to sorted
    minimises the sum of absolute differences), and it never depends on the stored order.
    When any time is unknown, acquisitions are paired in stored order. Surplus acquisitions of
    either modality come last, paired with None.
    """
    dated = all(t is not None for t in (*s1_times, *s2_times))

    def order(times: Sequence[Optional[str]]) -> list[int]:
        idx = list(range(len(times)))
        return sorted(idx, key=lambda i: (times[i], i)) if dated else idx

    o1, o2 = order(s1_times), order(s2_times)
    pairs = []
    for k in range(max(len(o1), len(o2))):
        i1 = o1[k] if k < len(o1) else None
        i2 = o2[k] if k < len(o2) else None
        gap = gap_days(s1_times[i1], s2_times[i2]) if i1 is not None and i2 is not None else None
        pairs.append(DatePair(k, i1, i2, gap))
    return pairs
