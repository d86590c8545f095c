"""Exact per-band statistics, computed in pieces on workers and combined on the driver.

Each worker keeps, per band, the count of valid pixels, their mean and the sum
of squared deviations (M2) in float64, and pieces are merged with the pairwise
update of Chan, Golub and LeVeque. That is exact to float64 rounding and, unlike
raw sums of squares, does not lose precision on reflectances of order 10^4.
Merging in a fixed order (shard order) makes the result bit-identical
whatever the number of workers.

Integer data (Sentinel-2 digital numbers) is summed exactly instead
(`IntegerSums`): per band the count, the sum and the sum of squares as Python
integers, turned into a mean and M2 once per shard with a single rounding each.
The sums are one pass over the stored integers, compiled with numba: no float
copy, no mask, no temporary array, and exact.

Half-precision floats (Sentinel-1 in dB in SSL4EO-S12 v1.1) take only 2^16
values, so they are counted instead (`HalfSums`): per band a histogram of the
16-bit patterns, one compiled pass a sample, and the moments of the finite
values computed once per shard from it, exactly.
"""

from __future__ import annotations

import functools
import logging
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class BandMoments:
    count: np.ndarray  # (C,) int64 valid pixels per band
    mean: np.ndarray  # (C,) float64
    m2: np.ndarray  # (C,) float64 sum of squared deviations from the mean

    @classmethod
    def zeros(cls, bands: int) -> "BandMoments":
        return cls(np.zeros(bands, np.int64), np.zeros(bands, np.float64), np.zeros(bands, np.float64))

    @classmethod
    def of(cls, x: np.ndarray, valid: Optional[np.ndarray] = None) -> "BandMoments":
        """Moments of ``x`` (C, H, W) over the pixels where ``valid`` (C, H, W) is True."""
        c = x.shape[0]
        flat = x.reshape(c, -1).astype(np.float64)
        if valid is not None and np.count_nonzero(valid) == valid.size:  # the common case: no mask to apply
            valid = None
        if valid is None:
            return cls._unmasked(flat)
        v = valid.reshape(c, -1)
        count = v.sum(axis=1).astype(np.int64)
        safe = np.maximum(count, 1)
        sums = np.where(v, flat, 0.0).sum(axis=1)
        mean = np.where(count > 0, sums / safe, 0.0)
        m2 = np.where(v, (flat - mean[:, None]) ** 2, 0.0).sum(axis=1)
        return cls(count, mean, m2)

    @classmethod
    def of_finite(cls, x: np.ndarray) -> "BandMoments":
        """Moments of floating ``x`` (C, H, W) over its finite pixels (Sentinel-1 in dB): `of` with the mask
        ``np.isfinite(x)``, the same numbers, but the finiteness is read from the float64 copy `of` makes anyway
        (numpy's isfinite on float16 is several times slower than the whole float64 pass)."""
        c = x.shape[0]
        flat = x.reshape(c, -1).astype(np.float64)
        finite = np.isfinite(flat)
        if np.count_nonzero(finite) == finite.size:
            return cls._unmasked(flat)
        return cls.of(flat.reshape(x.shape), finite.reshape(x.shape))

    @classmethod
    def _unmasked(cls, flat: np.ndarray) -> "BandMoments":
        """Moments of every pixel of ``flat`` (C, N), a float64 array this call may overwrite: the same
        operations as ``((flat - mean) ** 2).sum()``, so the same bits, with no temporary array."""
        c, n = flat.shape
        count = np.full(c, n, np.int64)
        if not n:
            return cls(count, np.zeros(c), np.zeros(c))
        mean = flat.sum(axis=1) / n  # what ndarray.mean computes
        flat -= mean[:, None]
        np.multiply(flat, flat, out=flat)
        return cls(count, mean, flat.sum(axis=1))

    def merge(self, other: "BandMoments") -> "BandMoments":
        n = self.count + other.count
        safe = np.maximum(n, 1)
        delta = other.mean - self.mean
        mean = np.where(n > 0, self.mean + delta * (other.count / safe), 0.0)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / safe)
        return BandMoments(n, mean, m2)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation over valid pixels (0 where a band has none)."""
        return np.sqrt(np.where(self.count > 0, self.m2 / np.maximum(self.count, 1), 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count.tolist(), "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BandMoments":
        return cls(np.asarray(d["count"], np.int64), np.asarray(d["mean"], np.float64), np.asarray(d["m2"], np.float64))

    @classmethod
    def exact(cls, count: list[int], total: list[int], squares: list[int], scale: int = 1) -> "BandMoments":
        """From exact integer sums of the values times ``scale``: mean = total / (count * scale) and
        M2 = (count * squares - total^2) / (count * scale^2), each computed in integers and rounded once (Python's
        int / int is correctly rounded)."""
        mean = [t / (n * scale) if n else 0.0 for n, t in zip(count, total)]
        m2 = [(n * q - t * t) / (n * scale * scale) if n else 0.0 for n, t, q in zip(count, total, squares)]
        return cls(np.asarray(count, np.int64), np.asarray(mean, np.float64), np.asarray(m2, np.float64))

    def summary(self, bands: list[str]) -> dict[str, Any]:
        return {
            "bands": list(bands),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "valid_pixels": [int(v) for v in self.count],
        }


class IntegerSums:
    """Exact per-band count, sum and sum of squares of integer images over the pixels that are not ``nodata``.

    One compiled pass per band (`integer_band_sums`) adds each pixel, its square and whether it is no-data into
    int64 accumulators, which are folded into Python integers (``count``, ``total``, ``squares``) before a band's
    sum of squares could leave int64: for 16-bit values after 2^31 pixels a band (46,000 x 46,000), so a shard's
    samples are added with no per-sample Python work beyond the call. A no-data pixel is counted out by its value
    instead of a mask.
    """

    PIECE = 2**31
    """Pixels of a band the int64 accumulators take before a fold: n * 65535^2 < 2^63."""

    def __init__(self, bands: int, nodata: int):
        self.nodata = int(nodata)
        self._count = [0] * bands
        self._total = [0] * bands
        self._squares = [0] * bands
        self._acc = np.zeros((bands, 3), np.int64)
        """Per band, since the last fold: sum, sum of squares, pixels equal to ``nodata``."""
        self._pixels = 0
        """Pixels a band added to ``_acc`` since the last fold."""

    @staticmethod
    def supports(x: np.ndarray) -> bool:
        """Integers of at most 16 bits (Sentinel-2 digital numbers): sums of squares cannot overflow int64."""
        return np.issubdtype(x.dtype, np.integer) and x.dtype.itemsize <= 2

    def add(self, x: np.ndarray) -> None:
        """Add ``x`` (C, H, W), an array that `supports` takes."""
        if not self.supports(x):
            raise TypeError(f"IntegerSums takes integers of at most 16 bits, got {x.dtype}")
        c = self._acc.shape[0]
        if x.ndim < 2 or x.shape[0] != c:  # the compiled kernel does not check its bounds
            raise ValueError(f"IntegerSums of {c} bands takes (C, ...) arrays with C = {c}, got shape {x.shape}")
        flat = np.ascontiguousarray(x.reshape(c, -1)).astype(x.dtype.newbyteorder("="), copy=False)
        info = np.iinfo(flat.dtype)
        # a no-data value the type cannot hold matches no pixel: one past its range says so within int64
        nodata = self.nodata if info.min <= self.nodata <= info.max else info.max + 1
        for start in range(0, max(flat.shape[1], 1), self.PIECE):
            piece = flat[:, start:start + self.PIECE]
            if self._pixels + piece.shape[1] > self.PIECE:
                self._fold()
            integer_band_sums()(piece, nodata, self._acc)
            self._pixels += piece.shape[1]

    def _fold(self) -> None:
        """Move the int64 accumulators into the Python integers, no-data pixels counted out."""
        for i, (total, squares, hits) in enumerate(self._acc.tolist()):
            self._count[i] += self._pixels - hits
            self._total[i] += total - self.nodata * hits
            self._squares[i] += squares - self.nodata * self.nodata * hits
        self._acc[:] = 0
        self._pixels = 0

    @property
    def count(self) -> list[int]:
        """Valid pixels a band."""
        self._fold()
        return self._count

    @property
    def total(self) -> list[int]:
        """Sum of the valid pixels a band."""
        self._fold()
        return self._total

    @property
    def squares(self) -> list[int]:
        """Sum of the squares of the valid pixels a band."""
        self._fold()
        return self._squares

    def moments(self) -> BandMoments:
        return BandMoments.exact(self.count, self.total, self.squares)


class HalfSums:
    """Exact per-band count, mean and M2 of half-precision images over their finite pixels.

    A float16 holds one of 2^16 bit patterns, so a sample is added by counting each band's patterns into a
    (C, 65536) int64 histogram (`half_band_histogram`, one compiled pass over the stored bits: no float64 copy, no
    mask), and `moments` reads the statistics off the histogram once: every finite float16 is an integer multiple
    of 2^-24 below 2^16 in magnitude, so the count, the sum and the sum of squares are exact integers (at scale
    2^24) and the mean and M2 are rounded once, like `IntegerSums`'. NaN and the infinities are not valid pixels:
    the same set as ``np.isfinite``. ~8x cheaper a sample than `BandMoments.of_finite` (the shard's reduction
    included, `bench/bench_statistics.py`), and exact where that rounds its float64 sums.
    """

    SCALE = 2**24
    """1 / the smallest positive float16 (a subnormal): value * SCALE is an integer for every finite float16."""

    def __init__(self, bands: int):
        self.hist = np.zeros((bands, 2**16), np.int64)

    @staticmethod
    def supports(x: np.ndarray) -> bool:
        return x.dtype.kind == "f" and x.dtype.itemsize == 2

    def add(self, x: np.ndarray) -> None:
        """Add ``x`` (C, H, W) of float16, either byte order."""
        if not self.supports(x):
            raise TypeError(f"HalfSums takes half-precision floats, got {x.dtype}")
        c = self.hist.shape[0]
        if x.ndim < 2 or x.shape[0] != c:  # the compiled kernel does not check its bounds
            raise ValueError(f"HalfSums of {c} bands takes (C, ...) arrays with C = {c}, got shape {x.shape}")
        bits = np.ascontiguousarray(x.reshape(c, -1)).view(np.dtype(np.uint16).newbyteorder(x.dtype.byteorder))
        half_band_histogram()(bits.astype(np.uint16, copy=False), self.hist)

    def moments(self) -> BandMoments:
        if int(self.hist.max(initial=0)) >= 2**31:  # past the int64 bounds of the grouped sums below: Python ints
            return self._moments_in_python_ints()
        # A finite float16 with exponent field e and fraction f is M * 2^(max(e-1, 0)) at SCALE, M = f + 1024 (e > 0)
        # or f (e = 0), M < 2^11. Patterns 0x0000-0x7BFF (positive) and 0x8000-0xFBFF (negative) hold e = 0..30
        # in rows of 1024 by f, so per exponent and sign sum(n * M) < 2^10 * 2^31 * 2^11 and sum(n * M^2) < 2^10 *
        # 2^31 * 2^22 = 2^63 are exact in int64; the rows are then shifted and added in Python ints.
        c = self.hist.shape[0]
        pos = self.hist[:, 0x0000:0x7C00].reshape(c, 31, 1024)
        neg = self.hist[:, 0x8000:0xFC00].reshape(c, 31, 1024)
        e = np.arange(31)
        m = np.arange(1024)[None, :] + np.where(e > 0, 1024, 0)[:, None]  # (31, 1024)
        shift = np.maximum(e - 1, 0).tolist()
        sums = [((h * m).sum(axis=2).tolist()) for h in (pos, neg)]  # (C, 31) each
        square_sums = [((h * (m * m)).sum(axis=2).tolist()) for h in (pos, neg)]
        count = [int(p) + int(n) for p, n in zip(pos.sum(axis=(1, 2)), neg.sum(axis=(1, 2)))]
        total = [sum((p - n) << k for p, n, k in zip(*rows, shift)) for rows in zip(*sums)]
        squares = [sum((p + n) << (2 * k) for p, n, k in zip(*rows, shift)) for rows in zip(*square_sums)]
        return BandMoments.exact(count, total, squares, scale=self.SCALE)

    def _moments_in_python_ints(self) -> BandMoments:
        patterns, scaled = _finite_halves()
        count, total, squares = [], [], []
        for band in self.hist:
            n = band[patterns]
            seen = np.flatnonzero(n)
            ns, vs = n[seen].tolist(), scaled[seen].tolist()  # Python ints: the products need more than 64 bits
            count.append(sum(ns))
            total.append(sum(map(operator.mul, ns, vs)))
            squares.append(sum(map(operator.mul, map(operator.mul, ns, vs), vs)))
        return BandMoments.exact(count, total, squares, scale=self.SCALE)


@functools.cache
def _finite_halves() -> tuple[np.ndarray, np.ndarray]:
    """The bit patterns of the finite float16 values (63,488 of 2^16) and their values times `HalfSums.SCALE`, as
    exact int64 (below 2^40 in magnitude)."""
    values = np.arange(2**16, dtype=np.uint16).view(np.float16)
    patterns = np.flatnonzero(np.isfinite(values))
    return patterns, (values[patterns].astype(np.float64) * HalfSums.SCALE).astype(np.int64)


def _compiled(kernel: Callable) -> Callable:
    """``kernel`` compiled by numba without the GIL, cached on disk where a cache location is writable: in
    ``$NUMBA_CACHE_DIR`` when set, else beside this module, else in ``~/.cache/numba``. Where none is (a read-only
    install and home folder), it is compiled in memory instead, once per process. numba is imported only here, so
    the driver and processes that never read samples (the checks' kernels) or compute statistics do not load it."""
    import numba

    try:
        return numba.njit(cache=True, nogil=True)(kernel)
    except RuntimeError as err:  # "cannot cache function ...: no locator available": nowhere to write the cache
        log.info("numba cannot cache the compiled kernel %s (%s); compiling it in memory", kernel.__name__, err)
        return numba.njit(nogil=True)(kernel)


@functools.cache
def half_band_histogram() -> Callable[[np.ndarray, np.ndarray], None]:
    """The compiled kernel ``f(bits, hist)``: for each band ``i`` of ``bits`` (C, N) uint16 (float16 patterns in
    native order), ``hist[i, p] += number of pixels with pattern p``. Compiled on first use (`_compiled`)."""

    def band_histogram(bits, hist):  # pragma: no cover - compiled; the Python body is the specification
        for i in range(bits.shape[0]):
            for j in range(bits.shape[1]):
                hist[i, bits[i, j]] += 1

    return _compiled(band_histogram)


@functools.cache
def integer_band_sums() -> Callable[[np.ndarray, int, np.ndarray], None]:
    """The compiled kernel ``f(x, nodata, out)``: for each band ``i`` of ``x`` (C, N) of 16-bit integers,
    ``out[i] += (sum of x[i], sum of x[i]**2, count of x[i] == nodata)`` in int64.

    numba (LLVM) turns the loop into vector code: one read of the stored integers, nothing written but the
    (C, 3) result, about 8x faster than numpy's float64 copy, sum and dot product a band. Compiled on first use
    (`_compiled`)."""

    def band_sums(x, nodata, out):  # pragma: no cover - compiled; the Python body is the specification
        for i in range(x.shape[0]):
            total = np.int64(0)
            squares = np.int64(0)
            hits = np.int64(0)
            for j in range(x.shape[1]):
                v = np.int64(x[i, j])
                total += v
                squares += v * v
                hits += v == nodata
            out[i, 0] += total
            out[i, 1] += squares
            out[i, 2] += hits

    return _compiled(band_sums)


@functools.cache
def half_nonfinite_count() -> Callable[[np.ndarray], int]:
    """The compiled kernel ``f(bits)``: how many of ``bits`` (1-D uint16, float16 patterns in native order) are NaN or
    an infinity (every exponent bit set, IEEE 754 binary16). One vectorised pass, no temporary array: ~3x faster than
    numpy's mask, comparison and count over a sample's S1. Compiled on first use (`_compiled`)."""

    def nonfinite(bits):  # pragma: no cover - compiled; the Python body is the specification
        n = 0
        for j in range(bits.shape[0]):
            n += (bits[j] & 0x7C00) == 0x7C00
        return n

    return _compiled(nonfinite)


@functools.cache
def first_other_than() -> Callable[[np.ndarray, Any], int]:
    """The compiled kernel ``f(x, value)``: the index of the first element of ``x`` (1-D) that is not ``value``, or -1.
    It stops there: a sample's "has it any valid pixel" costs its first pixel, where a mask costs every one (the
    whole scan remains for an image of no-data only, which is rejected). Compiled on first use (`_compiled`)."""

    def first(x, value):  # pragma: no cover - compiled; the Python body is the specification
        for j in range(x.shape[0]):
            if x[j] != value:
                return j
        return -1

    return _compiled(first)
