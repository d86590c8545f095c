"""The project's shards through plain `webdataset`: what the TerraTorch datamodule reads.

A pipeline of webdataset's own stages (shard list, split by worker, tar expansion, grouping by key, its
default decoders: ``.npy`` → numpy array, ``.json`` → dict). The one stage added opens each shard through
fsspec, so the same code reads local folders and object storage (``s3://``, ``gs://``): webdataset's own
URL opener knows local paths, ``pipe:`` and HTTP only.

A sample as webdataset decodes it: ``__key__``, ``s1.npy`` (2, H, W) VV, VH in dB, ``s2.npy`` (C, H, W)
reflectance x 10000 (both in the shards' dtypes), ``json`` (the metadata; BigEarthNet: ``label_vector``).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.manifest import Manifest
from pipeline.storage import url_to_fs


def open_with_fsspec(storage_options: Optional[dict[str, Any]] = None):
    """A webdataset stage: ``{"url": ...}`` → ``{"url": ..., "stream": <open file>}``, closed once read."""

    def stage(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            fs, path = url_to_fs(sample["url"], storage_options)
            with fs.open(path, "rb") as stream:
                yield {**sample, "stream": stream}  # tar_file_expander reads it before asking for the next

    return stage


def shard_samples(manifest: Manifest, storage_options: Optional[dict[str, Any]] = None, shuffle: int = 0,
                  seed: int = 0) -> wds.DataPipeline:
    """Every sample of ``manifest``'s shards, decoded by webdataset; an IterableDataset.

    shuffle > 0: shards in a seeded order and samples through a buffer of that many; 0: manifest order.
    With DataLoader workers each reads its own shards (webdataset's ``split_by_worker``)."""
    stages: list[Any] = [wds.SimpleShardList([s.url for s in manifest.shards])]
    if shuffle:
        stages.append(wds.detshuffle(len(manifest.shards), seed=seed))
    stages += [wds.split_by_worker, open_with_fsspec(storage_options), tar_file_expander, group_by_keys,
               wds.decode()]
    if shuffle:
        stages.append(wds.shuffle(shuffle, seed=seed))
    return wds.DataPipeline(*stages)


def to_example(sample: dict[str, Any], label: Optional[str] = "label_vector") -> dict[str, Any]:
    """A decoded sample → what TerraTorch's tasks take: ``image`` {"s1": (2, H, W), "s2": (C, H, W)} float32
    in the stored units (raw: the backbone normalises), and ``label`` (float32, from the json's ``label``
    field) when ``label`` is given."""
    out: dict[str, Any] = {"image": {m: torch.from_numpy(np.asarray(sample[f"{m}.npy"], dtype=np.float32))
                                     for m in ("s1", "s2")}}
    if label is not None:
        meta = sample.get("json") or {}
        if label not in meta:
            raise KeyError(f"sample {sample.get('__key__')} has no `{label}` in its json: labelled shards "
                           "(BigEarthNet through pipeline.preprocess) are needed")
        out["label"] = torch.tensor(meta[label], dtype=torch.float32)
    return out
