"""The sample index written beside the manifest: every sample's key, shard, byte offset and labels.

Expected values come from walking the shards with the standard library's `tarfile` and reading each json
member, not from the pipeline's reader.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import run_module
from pipeline import synthetic
from pipeline.index import read_index
from pipeline.manifest import load_manifest


@pytest.fixture(scope="module")
def ben(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ben_index")
    synthetic.make_bigearthnet(str(root / "archive"), n_patches=18, size=24, seed=4)
    run_module("pipeline.preprocess", "--no-progress", "--source", "bigearthnet", "--input", str(root / "archive"),
               "--output", str(root / "shards"), "--split", "train", "--workers", "1", "--samples-per-shard", "2")
    return root / "shards"


def walk(folder: Path) -> list[tuple[str, str, int, list[int]]]:
    """(key, shard, offset of the first header, label_vector) of every sample, with tarfile only."""
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = []
    for shard in manifest["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            for info in tar.getmembers():
                if info.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(info).read())
                    rows.append((info.name[: -len(".json")], shard["name"], info.offset, meta["label_vector"]))
    return rows


@pytest.mark.slow
def test_index_lists_every_sample_where_it_is_with_its_labels(ben):
    body = json.loads((ben / "manifest.json").read_text())
    data = (ben / "index.parquet").read_bytes()
    assert body["index"] == {"name": "index.parquet", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    table = pq.read_table(io.BytesIO(data))
    assert table.column_names == ["key", "shard", "offset", "label_vector"]
    expected = walk(ben)
    assert len(expected) == body["totals"]["samples"] > 4
    names = [s["name"] for s in body["shards"]]
    got = [(k, names[s], o, v) for k, s, o, v in zip(*(table.column(c).to_pylist() for c in table.column_names))]
    assert got == expected
    index = read_index(load_manifest(str(ben / "manifest.json")))
    assert index.keys == [r[0] for r in expected] and index.positions == [(r[1], r[2]) for r in expected]
    assert index.labels.shape == (len(expected), 19) and index.labels.tolist() == [r[3] for r in expected]


@pytest.mark.slow
def test_a_damaged_index_is_refused(ben, tmp_path):
    import shutil

    copy = tmp_path / "set"
    shutil.copytree(ben, copy)
    data = bytearray((copy / "index.parquet").read_bytes())
    data[-20] ^= 0xFF
    (copy / "index.parquet").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match the manifest's index entry"):
        read_index(load_manifest(str(copy / "manifest.json")))
