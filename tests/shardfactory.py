"""Tiny shard sets in the pipeline's exact format, for loader tests and benchmarks.

Every sample carries its global sample number (0 .. N-1, in manifest order) in
``s2[0, 0, 0]`` and ``s1[0, 0, 0]``, and its key is ``sample_<number>``, so a
test can tell exactly which samples a batch holds.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Optional, Sequence

import numpy as np

from pipeline.shards import SHARD_NAME, Sample, ShardWriter, make_key
from pipeline.stats import BandMoments
from pipeline.storage import join, put_atomic, url_to_fs, write_bytes_atomic

S1_BANDS = ["VV", "VH"]
S2_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
S2_NODATA = 0


def sample_number(s2: np.ndarray) -> int:
    """The global sample number a factory sample carries, from its (C, H, W) S2 array."""
    return int(s2[0, 0, 0])


def make_sample(number: int, hw: int, s2_channels: int, rng: np.random.Generator, s1_dtype: str, s2_dtype: str,
                labels: bool, s2_bands: Optional[Sequence[str]] = None) -> Sample:
    s2 = rng.integers(1, 4000, (s2_channels, hw, hw)).astype(s2_dtype)  # reflectance x 10000, never no-data
    s2[0, 0, 0] = number
    s1 = rng.normal(-14.0, 5.0, (2, hw, hw)).astype(s1_dtype)  # backscatter dB
    s1[0, 0, 0] = number
    meta: dict[str, Any] = {"sample_id": f"{number:07d}", "number": number, "source": "shardfactory",
                            "s1_bands": S1_BANDS, "s2_bands": list(s2_bands or S2_BANDS[:s2_channels])}
    if labels:
        meta["labels"] = [int(number % 5), int(number % 3) + 5]
    return Sample(make_key("sample", f"{number:06d}"), s1, s2, meta)


def make_shard_set(
    folder_or_url: str,
    shard_sizes: Sequence[int] = (5, 3, 7),
    hw: int = 16,
    s2_channels: int = 13,
    seed: int = 0,
    labels: bool = False,
    s1_dtype: str = "float32",
    s2_dtype: str = "int16",
    split: str = "train",
    storage_options: Optional[dict[str, Any]] = None,
    s2_bands: Optional[Sequence[str]] = None,
    sample_fn: Optional[Callable[[int, np.random.Generator], Sample]] = None,
    source: Optional[dict[str, Any]] = None,
) -> str:
    """Write shards of ``shard_sizes`` samples and a manifest.json under ``folder_or_url``; return the manifest URL.

    The manifest has the pipeline's layout: shards with real byte counts and sha256,
    per-band stats over valid pixels (S2 != 0, S1 finite) merged with the pipeline's BandMoments (the shards
    here are inputs to loader and training tests, which do not test the statistics themselves),
    modalities with dtype and no-data, image_size [hw, hw].
    """
    bands2 = list(s2_bands) if s2_bands is not None else S2_BANDS[:s2_channels]  # names, else the first N
    s2_channels = len(bands2)
    fs, root = url_to_fs(folder_or_url, storage_options)
    rng = np.random.default_rng(seed)
    records = []
    m1, m2 = BandMoments.zeros(2), BandMoments.zeros(s2_channels)
    number = 0
    with tempfile.TemporaryDirectory(prefix="shardfactory-") as tmp:
        for index, size in enumerate(shard_sizes):
            name = SHARD_NAME.format(split=split, index=index)
            local = os.path.join(tmp, name)
            with ShardWriter(local) as writer:
                for _ in range(size):
                    sample = (sample_fn(number, rng) if sample_fn is not None else
                              make_sample(number, hw, s2_channels, rng, s1_dtype, s2_dtype, labels, bands2))
                    writer.write(sample)
                    m1 = m1.merge(BandMoments.of(sample.s1, np.isfinite(sample.s1)))
                    m2 = m2.merge(BandMoments.of(sample.s2, sample.s2 != S2_NODATA))
                    number += 1
            put_atomic(fs, local, f"{root}/{name}")
            records.append({"name": name, "samples": writer.samples, "bytes": writer.bytes, "sha256": writer.sha256})
    manifest = {
        "format": "fusmae-webdataset",
        "format_version": 1,
        "split": split,
        "source": source or {"name": "shardfactory", "seed": seed},
        "shards": records,
        "totals": {"shards": len(records), "samples": number, "bytes": sum(r["bytes"] for r in records),
                   "input_samples": number, "quarantined": 0},
        "image_size": [hw, hw],
        "modalities": {
            "s1": {"bands": S1_BANDS, "dtype": s1_dtype, "units": "backscatter dB", "nodata": "non-finite",
                   "member": "s1.npy", "layout": "(bands, H, W)"},
            "s2": {"bands": bands2, "dtype": s2_dtype, "units": "reflectance x 10000",
                   "nodata": S2_NODATA, "member": "s2.npy", "layout": "(bands, H, W)"},
        },
        "stats": {
            "s1": m1.summary(S1_BANDS),
            "s2": m2.summary(bands2),
        },
    }
    url = join(folder_or_url, "manifest.json")
    write_bytes_atomic(fs, f"{root}/manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return url
