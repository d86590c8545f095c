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
That needs no float64 copy of the whole array and no mask, and is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np


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
            count = np.full(c, flat.shape[1], np.int64)
            mean = flat.mean(axis=1) if flat.shape[1] else np.zeros(c)
            m2 = ((flat - mean[:, None]) ** 2).sum(axis=1)
            return cls(count, mean, m2)
        v = valid.reshape(c, -1)
        count = v.sum(axis=1).astype(np.int64)
        safe = np.maximum(count, 1)
        sums = np.where(v, flat, 0.0).sum(axis=1)
        mean = np.where(count > 0, sums / safe, 0.0)
        m2 = np.where(v, (flat - mean[:, None]) ** 2, 0.0).sum(axis=1)
        return cls(count, mean, m2)

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
    def exact(cls, count: list[int], total: list[int], squares: list[int]) -> "BandMoments":
        """From exact integer sums: mean = total / count and M2 = (count * squares - total^2) / count, each
        computed in integers and rounded once (Python's int / int is correctly rounded)."""
        mean = [t / n if n else 0.0 for n, t in zip(count, total)]
        m2 = [(n * q - t * t) / n if n else 0.0 for n, t, q in zip(count, total, squares)]
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

    Each band is summed in float64, which is exact while every partial sum stays below 2^53 (16-bit values on
    up to 2^21 pixels a band: 1448 x 1448); larger bands are summed in int64 by einsum (exact up to 2^31
    pixels a band). A no-data pixel is counted out by its value instead of a mask.
    """

    def __init__(self, bands: int, nodata: int):
        self.nodata = int(nodata)
        self.count = [0] * bands
        self.total = [0] * bands
        self.squares = [0] * bands

    @staticmethod
    def supports(x: np.ndarray) -> bool:
        """Integers of at most 16 bits (Sentinel-2 digital numbers): sums of squares cannot overflow int64."""
        return np.issubdtype(x.dtype, np.integer) and x.dtype.itemsize <= 2

    def add(self, x: np.ndarray) -> None:
        """Add ``x`` (C, H, W), an array that `supports` takes."""
        if not self.supports(x):
            raise TypeError(f"IntegerSums takes integers of at most 16 bits, got {x.dtype}")
        c = x.shape[0]
        flat = x.reshape(c, -1)
        n = flat.shape[1]
        in_float = n * 2**32 < 2**53  # every partial sum of squares an exact float64 integer
        for i in range(c):
            band = flat[i]
            if in_float:
                f = band.astype(np.float64)
                # einsum, not BLAS's dot: a threaded BLAS stalls when every core is busy with other workers
                total, squares = int(f.sum()), int(np.einsum("i,i->", f, f))
            else:
                total = int(band.sum(dtype=np.int64))
                squares = int(np.einsum("i,i->", band, band, dtype=np.int64))
            if self.nodata:
                nodata_pixels = int(np.count_nonzero(band == self.nodata))
            else:
                nodata_pixels = n - int(np.count_nonzero(band))
            self.count[i] += n - nodata_pixels
            self.total[i] += total - self.nodata * nodata_pixels
            self.squares[i] += squares - self.nodata * self.nodata * nodata_pixels

    def moments(self) -> BandMoments:
        return BandMoments.exact(self.count, self.total, self.squares)
