"""Exact per-band statistics, computed in pieces on workers and combined on the driver.

Each worker keeps, per band, the count of valid pixels, their mean and the sum
of squared deviations (M2) in float64, and pieces are merged with the pairwise
update of Chan, Golub and LeVeque. That is exact to float64 rounding and, unlike
raw sums of squares, does not lose precision on reflectances of order 10^4.
Merging in a fixed order (shard order) makes the result bit-identical
whatever the number of workers.
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

    def summary(self, bands: list[str]) -> dict[str, Any]:
        return {
            "bands": list(bands),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "valid_pixels": [int(v) for v in self.count],
        }
