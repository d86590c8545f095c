"""The sample index of a shard set: where every sample is, and its labels, in one small file.

``index.parquet`` beside ``manifest.json`` has one row per sample, in manifest
order: ``key`` (string), ``shard`` (int32, position in the manifest's shard list),
``offset`` (int64, byte offset of the sample's first tar header in its shard) and,
for labelled sets, ``label_vector`` (list of uint8). The manifest names it with its
size and sha256 (``index``), so a reader checks it like a shard.

It lets evaluation choose a label subset and read only the chosen samples, by
offset, without walking the tar headers of the whole split. Shard sets written
before the index existed have none; readers fall back to a metadata pass.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from pipeline.storage import read_bytes, redact_url, url_to_fs, write_bytes_atomic

INDEX = "index.parquet"


@dataclass(frozen=True)
class SampleIndex:
    keys: list[str]
    shards: list[str]
    """The shard name of each sample."""
    offsets: np.ndarray
    """(N,) int64 byte offsets of each sample's first tar header."""
    labels: Optional[np.ndarray]
    """(N, C) uint8 label vectors, or None for an unlabelled set."""

    @property
    def positions(self) -> list[tuple[str, int]]:
        return [(s, int(o)) for s, o in zip(self.shards, self.offsets)]


def index_table(records: Sequence[dict[str, Any]]) -> Optional[bytes]:
    """The parquet bytes of the index of the published shard ``records`` (in manifest order), from each record's
    ``rows`` ([key, offset, label_vector or None]); None when a record has no rows (written by an older version)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if any("rows" not in rec for rec in records):
        return None
    keys, shards, offsets, labels = [], [], [], []
    for i, rec in enumerate(records):
        for key, offset, vec in rec["rows"]:
            keys.append(key)
            shards.append(i)
            offsets.append(offset)
            labels.append(vec)
    columns = {"key": pa.array(keys, pa.string()), "shard": pa.array(shards, pa.int32()),
               "offset": pa.array(offsets, pa.int64())}
    if labels and all(v is not None for v in labels):
        columns["label_vector"] = pa.array(labels, pa.list_(pa.uint8()))
    buf = io.BytesIO()
    # No statistics or timestamps: the same rows give the same bytes (reruns stay byte-identical).
    pq.write_table(pa.table(columns), buf, compression="zstd", write_statistics=False)
    return buf.getvalue()


def write_index(fs: Any, root: str, data: bytes) -> dict[str, Any]:
    """Write ``index.parquet`` under ``root``; its entry for the manifest (name, bytes, sha256)."""
    write_bytes_atomic(fs, f"{root}/{INDEX}", data)
    return {"name": INDEX, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_index(manifest: Any, storage_options: Optional[dict[str, Any]] = None) -> Optional[SampleIndex]:
    """The index of a loaded `Manifest`, checked against its entry; None when the set has none."""
    import pyarrow.parquet as pq

    entry = manifest.index
    if not entry:
        return None
    base = manifest.url.rstrip("/").rsplit("/", 1)[0]
    url = f"{base}/{entry['name']}"
    fs, path = url_to_fs(url, storage_options)
    data = read_bytes(fs, path)
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{redact_url(url)}: {len(data)} bytes that do not match the manifest's index entry "
                         f"({entry['bytes']} bytes, sha256 {entry['sha256'][:12]}…)")
    table = pq.read_table(io.BytesIO(data))
    names = [s.name for s in manifest.shards]
    shard_of = table.column("shard").to_numpy()
    labels = None
    if "label_vector" in table.column_names:
        labels = np.asarray(table.column("label_vector").to_pylist(), dtype=np.uint8).reshape(table.num_rows, -1)
    return SampleIndex(table.column("key").to_pylist(), [names[i] for i in shard_of],
                       table.column("offset").to_numpy().astype(np.int64), labels)
