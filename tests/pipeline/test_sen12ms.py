"""SEN12MS: the triplet layout, the scene-classification labels and the split lists, end to end.

Labels are checked against the generator's own land-cover arrays with numpy and the simplified IGBP
grouping written out here (forests 1-5, shrublands 6-7, savannas 8-9, grassland 10, wetland 11,
croplands 12 + 14, urban 13, snow 15, barren 16, water 17: schmitt-muc/SEN12MS classification/dataset.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import webdataset as wds

from conftest import S3_ENV, fresh_s3fs, run_module
from pipeline import synthetic
from pipeline.sources import SOURCES, SourceOptions
from pipeline.sources.sen12ms import scene_labels

GROUPS = {"Forest": (1, 2, 3, 4, 5), "Shrubland": (6, 7), "Savanna": (8, 9), "Grassland": (10,), "Wetlands": (11,),
          "Croplands": (12, 14), "Urban/Built-up": (13,), "Snow/Ice": (15,), "Barren": (16,), "Water": (17,)}
S2_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]


def expected_labels(igbp: np.ndarray) -> dict:
    counts = np.array([np.isin(igbp, codes).sum() for codes in GROUPS.values()])
    vector = [int(c / igbp.size >= 0.1) for c in counts]
    top = int(np.argmax(counts))
    return {"label_vector": vector, "labels": [n for n, v in zip(GROUPS, vector) if v],
            "label": list(GROUPS)[top], "label_index": top}


def _inline(fn, args):
    return [fn(a) for a in args]


def read_set(folder: Path) -> tuple[dict, list, dict]:
    manifest = json.loads((folder / "manifest.json").read_text())
    quarantine = [json.loads(line) for line in (folder / "quarantine.jsonl").read_text().splitlines()]
    urls = [str(folder / s["name"]) for s in manifest["shards"]]
    samples = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode()}
    return manifest, quarantine, samples


# -- labels ----------------------------------------------------------------------------------------


def test_scene_labels_literal():
    igbp = np.array([1] * 45 + [4] * 10 + [12] * 5 + [14] * 5 + [13] * 9 + [17] * 26, dtype=np.uint16).reshape(10, 10)
    got = scene_labels(igbp)
    # forest 55 %, croplands 5 + 5 = 10 % (a label only as a group), urban 9 % (none), water 26 %
    assert got == {"labels": ["Forest", "Croplands", "Water"], "label_vector": [1, 0, 0, 0, 0, 1, 0, 0, 0, 1],
                   "label": "Forest", "label_index": 0}
    tie = np.array([17] * 50 + [10] * 50, dtype=np.uint16).reshape(10, 10)
    assert scene_labels(tie)["label"] == "Grassland"  # the first of equal classes, as argmax
    assert scene_labels(np.full((4, 4), 255, dtype=np.uint16)) is None  # no IGBP class at all


# -- the reader on the generated tree --------------------------------------------------------------


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("sen12ms")
    return root, synthetic.make_sen12ms(root, n_scenes=4, patches_per_scene=2, size=32, seed=4)


def test_layout_and_dtypes(archive):
    root, out = archive
    pid = out["patches"][0]
    roi, scene, patch = pid.rsplit("_", 2)
    for modality, (count, dtype) in {"s1": (2, "float32"), "s2": (13, "uint16"), "lc": (4, "uint16")}.items():
        path = root / roi / f"{modality}_{scene}" / f"{roi}_{modality}_{scene}_{patch}.tif"
        assert str(path) == out["files"][pid][modality]
        with rasterio.open(path) as src:
            assert (src.count, src.dtypes[0], src.shape, src.res) == (count, dtype, (32, 32), (10.0, 10.0))
            assert src.crs.to_string().startswith("EPSG:32")
    with rasterio.open(out["files"][pid]["lc"]) as src:
        np.testing.assert_array_equal(src.read(1), out["igbp"][pid])
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "ROIs1158_spring", "ROIs1868_summer", "ROIs1970_fall", "ROIs2017_winter"]
    listed = (root / "test_list.txt").read_text().split()
    assert listed == [Path(out["files"][p]["s2"]).name for p in out["splits"]["test"]] and len(listed) == 2


def test_reader_pairs_triplets_and_reports_what_is_missing(archive, tmp_path):
    root, out = archive
    src = tmp_path / "copy"
    shutil.copytree(root, src)
    train = out["splits"]["train"]
    Path(out["files"][train[0]]["lc"].replace(str(root), str(src))).unlink()
    with open(src / "train_list.txt", "a") as f:
        f.write("ROIs1158_spring_s2_999_p1.tif\nreadme.md\n")
    source = SOURCES["sen12ms"](str(src), SourceOptions())
    assert source.available_splits() == ["train", "test"]
    items, rejects = source.plan("train", _inline)
    assert [it.sample_id for it in items] == sorted(train[1:], key=lambda p: (p.rsplit("_", 2)[0],
                                                                              int(p.rsplit("_", 2)[1]),
                                                                              int(p.rsplit("_p", 1)[1])))
    assert sorted((r.reason, r.sample_id) for r in rejects) == sorted([
        ("missing_partner", "ROIs1158_spring_999_p1"), ("missing_partner", train[0]), ("unreadable", "readme.md")])
    assert "no lc file" in next(r.detail for r in rejects if r.sample_id == train[0])
    # without the split lists, every patch is one split
    (src / "train_list.txt").unlink()
    (src / "test_list.txt").unlink()
    source = SOURCES["sen12ms"](str(src), SourceOptions())
    assert source.available_splits() == ["train"]
    items, rejects = source.plan("train", _inline)
    assert len(items) == len(out["patches"]) - 1 and [r.reason for r in rejects] == ["missing_partner"]
    with pytest.raises(FileNotFoundError, match="L1C only"):
        SOURCES["sen12ms"](str(src), SourceOptions(s2_product="L2A")).available_splits()


# -- end to end ------------------------------------------------------------------------------------


def _check_samples(samples: dict, out: dict, split: str) -> None:
    assert set(samples) == set(out["splits"][split])
    for pid, s in samples.items():
        meta = s["json"]
        with rasterio.open(out["files"][pid]["s2"]) as f2, rasterio.open(out["files"][pid]["s1"]) as f1:
            np.testing.assert_array_equal(s["s2.npy"], f2.read())
            np.testing.assert_array_equal(s["s1.npy"], f1.read())
        assert s["s2.npy"].dtype == np.uint16 and s["s1.npy"].dtype == np.float32
        assert {k: meta[k] for k in ("label_vector", "labels", "label", "label_index")} == expected_labels(
            out["igbp"][pid])
        assert meta["sample_id"] == pid and meta["split"] == split and meta["source"] == "sen12ms"
        assert meta["s2_bands"] == S2_BANDS and meta["s1_bands"] == ["VV", "VH"]
        assert meta["season"] == pid.split("_")[1] and meta["crs"].startswith("EPSG:32")


@pytest.mark.slow
def test_sen12ms_end_to_end_local(archive, tmp_path):
    root, out = archive
    dest = tmp_path / "shards"
    run_module("pipeline.preprocess", "--no-progress", "--source", "sen12ms", "--input", str(root),
               "--output", str(dest), "--split", "all", "--workers", "2")
    for split in ("train", "test"):
        manifest, quarantine, samples = read_set(dest / split)
        assert quarantine == [] and manifest["totals"]["input_samples"] == len(out["splits"][split])
        assert manifest["source"]["label_classes"] == list(GROUPS)
        assert manifest["source"]["splits"] == {"train": "train_list.txt", "test": "test_list.txt"}
        assert manifest["modalities"]["s2"]["bands"] == S2_BANDS
        _check_samples(samples, out, split)


@pytest.mark.slow
def test_sen12ms_end_to_end_s3_with_quarantine(archive, tmp_path, s3_bucket):
    root, out = archive
    victim = out["splits"]["train"][1]
    local = tmp_path / "archive"
    shutil.copytree(root, local)
    s2 = Path(out["files"][victim]["s2"].replace(str(root), str(local)))
    s2.write_bytes(s2.read_bytes()[:300])  # truncated
    fs = fresh_s3fs()
    fs.put(str(local), f"{s3_bucket}/sen12ms", recursive=True)
    out_url = f"{s3_bucket}/shards"
    proc = run_module("pipeline.preprocess", "--no-progress", "--source", "sen12ms", "--input",
                      f"{s3_bucket}/sen12ms", "--output", out_url, "--split", "train", "--workers", "1")
    back = tmp_path / "back"
    fresh_s3fs().get(out_url, str(back), recursive=True)
    manifest, quarantine, samples = read_set(back)
    assert [(q["reason"], q["sample_id"]) for q in quarantine] == [("unreadable", victim)]
    assert quarantine[0]["url"].startswith("s3://") and quarantine[0]["url"].endswith(s2.name)
    assert manifest["totals"]["input_samples"] == len(out["splits"]["train"]) == len(samples) + 1
    _check_samples(samples, {**out, "splits": {"train": [p for p in out["splits"]["train"] if p != victim]}}, "train")
    for text in ((back / "manifest.json").read_text(), proc.stdout, proc.stderr):
        assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in text


def test_generator_is_deterministic_and_on_the_cli(tmp_path):
    synthetic.make_sen12ms(tmp_path / "a", n_scenes=4, patches_per_scene=1, size=12, seed=9)
    out = synthetic.main(["sen12ms", str(tmp_path / "b"), "--n", "1", "--size", "12", "--seed", "9"])
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(out["patches"]) == 4  # the CLI's 4 scenes, one per season folder
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
