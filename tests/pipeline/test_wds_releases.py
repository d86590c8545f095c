"""The WebDataset releases (SSL4EO-S12 v1.1 as served today, TerraMesh): the generator's files read independently
(tarfile, zipfile, zarr, xarray), the reader's plan and samples against them without Ray, its clear errors, the job's
refusal to commit a split with no sample, and (slow) the CLI end to end on Ray, local and S3."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.core.buffer import default_buffer_prototype

from conftest import S3_ENV, fresh_s3fs, run_module
from pipeline import synthetic
from pipeline.commit import commit_split
from pipeline.job import PreprocessError, PreprocessSettings
from pipeline.plan import ShardTask, SplitPlan
from pipeline.shards import Sample
from pipeline.sources import SOURCES, Rejection, SourceOptions, WorkItem
from pipeline.sources.wds_tar import index_tar
from pipeline.sources.wds_zarr import product_folders

L1C_NAMES = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
L2A_NAMES = [b for b in L1C_NAMES if b != "B10"]
WHOLE_LOCATION = {"unreadable", "missing_partner", "wrong_shape"}  # defects that lose every time step


def tar_members(path) -> dict[str, bytes]:
    """{key: bytes} of the .zarr.zip members of a tar, in order, read the way the releases' own loaders read
    them: webdataset's tar iteration (``multi_tarfile_samples`` in DLR-MF-DAS/SSL4EO-S12-v1.1's
    ssl4eos12_dataset.py and TerraMesh's terramesh.py iterate the tars with webdataset)."""
    from webdataset.tariterators import tar_file_iterator

    with open(path, "rb") as f:
        return {r["fname"][: -len(".zarr.zip")]: r["data"] for r in tar_file_iterator(f)
                if r["fname"].endswith(".zarr.zip")}


def open_member(data: bytes) -> xr.Dataset:
    """A member opened with zipfile + zarr + xarray only."""
    to_buffer = default_buffer_prototype().buffer.from_bytes
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert ".zmetadata" in zf.namelist()  # consolidated metadata
        entries = {n: to_buffer(zf.read(n)) for n in zf.namelist()}
    return xr.open_zarr(zarr.storage.MemoryStore(store_dict=entries, read_only=True), consolidated=True,
                        chunks=None, zarr_format=2)


def listing_map(fn, args):
    return [fn(a) for a in args]


def run_source(name: str, root, split: str, **options):
    """(planned items, rejections while listing, results of reading) of one split, no Ray."""
    src = SOURCES[name](str(root), SourceOptions(**options))
    items, rejects = src.plan(split, listing_map)
    return items, rejects, list(src.read(items, split))


@pytest.fixture(scope="module")
def ssl4eo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl4eo_wds")
    inv = synthetic.make_ssl4eo_wds(root, splits={"train": 2, "val": 1}, samples_per_shard=3, size=24, seed=4,
                                    defects=["unreadable", "missing_partner", "wrong_shape", "non_finite",
                                             "all_nodata"])
    return root, inv


@pytest.fixture(scope="module")
def terramesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("terramesh")
    inv = synthetic.make_terramesh(root, splits={"train": {"majortom": 1, "ssl4eos12": 1}}, samples_per_shard=3,
                                   size=24, seed=5, defects=["missing_partner", "non_finite"])
    return root, inv


# -- the generator writes the published member format ---------------------------------------


def test_ssl4eo_members_follow_the_published_format(ssl4eo):
    root, inv = ssl4eo
    assert sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*.tar")) == [
        f"{split}/{folder}/ssl4eos12_shard_{n:06d}.tar" for split, shards in (("train", 2), ("val", 1))
        for folder in ("S1GRD", "S2L1C", "S2L2A") for n in range(1, shards + 1)]
    val = Path(root) / "val"
    s1, s2 = tar_members(val / "S1GRD/ssl4eos12_shard_000001.tar"), tar_members(val / "S2L1C/ssl4eos12_shard_000001.tar")
    assert list(s1) == list(s2) == inv["splits"]["val"]["members"]["ssl4eos12_shard_000001.tar"]
    d1, d2 = open_member(next(iter(s1.values()))), open_member(next(iter(s2.values())))
    assert d1["bands"].dims == d2["bands"].dims == ("time", "band", "y", "x")
    assert d1["bands"].shape == (4, 2, 24, 24) and d2["bands"].shape == (4, 13, 24, 24)
    assert (d1["bands"].dtype, d2["bands"].dtype) == (np.float16, np.int16)
    assert list(d1["band"].values) == ["vv", "vh"] and list(d2["band"].values) == L1C_NAMES
    assert d1["time"].dtype == "datetime64[ns]" and np.all(np.diff(d2["time"].values) > np.timedelta64(0))
    assert d2["cloud_mask"].dims == ("time", "y", "x") and d2["cloud_mask"].dtype == np.uint8
    assert "cloud_mask" not in d1
    assert d1["center_lat"].shape == () and float(d1["center_lat"]) == float(d2["center_lat"])
    assert int(d2["bands"].values.min()) > 0  # no +1000 offset: plain reflectance x 10000, 0 never written
    l2a = open_member(next(iter(tar_members(val / "S2L2A/ssl4eos12_shard_000001.tar").values())))
    assert list(l2a["band"].values) == L2A_NAMES


def test_generator_is_byte_reproducible(tmp_path):
    a = synthetic.make_terramesh(tmp_path / "a", splits={"val": {"ssl4eos12": 1}}, samples_per_shard=2, size=12)
    b = synthetic.make_terramesh(tmp_path / "b", splits={"val": {"ssl4eos12": 1}}, samples_per_shard=2, size=12)
    for name, folders in a["splits"]["val"]["shards"].items():
        for folder, path in folders.items():
            assert Path(path).read_bytes() == Path(b["splits"]["val"]["shards"][name][folder]).read_bytes()


# -- the reader: plan and samples against the generator's files ------------------------------


def expected_keys(inv, split) -> set[str]:
    """Keys of the samples that must be written: every location x time step the defects spare."""
    t_count, defects = inv["times"], inv["defects"]
    out = set()
    for keys in inv["splits"][split]["members"].values():
        for key in keys:
            kind = defects.get(key)
            out |= {f"{key}_t{t}" for t in range(t_count) if not (kind in WHOLE_LOCATION or (kind and t == 0))}
    return out


def check_samples(root, inv, split, results, s2_folder, s1_folder_of):
    """Every written sample equals its members' values bit for bit; returns the samples by key."""
    samples = {r.key: r for r in results if isinstance(r, Sample)}
    assert set(samples) == expected_keys(inv, split)
    names = L1C_NAMES if s2_folder == "S2L1C" else L2A_NAMES
    for shard, keys in inv["splits"][split]["members"].items():
        s1 = tar_members(Path(root) / split / s1_folder_of(shard) / shard)
        s2 = tar_members(Path(root) / split / s2_folder / shard)
        for key in keys:
            for t in range(inv["times"]):
                got = samples.get(f"{key}_t{t}")
                if got is None:
                    continue
                d1, d2 = open_member(s1[key]), open_member(s2[key])
                np.testing.assert_array_equal(got.s1, d1["bands"].values[t])
                assert got.s1.dtype == np.float16 and got.s2.dtype == np.int16
                stored = list(d2["band"].values)
                np.testing.assert_array_equal(got.s2, d2["bands"].values[t][[stored.index(b) for b in names]])
                assert got.meta["lat"] == float(d2["center_lat"]) and got.meta["crs"] == f"EPSG:{int(d2['crs'])}"
                assert got.meta["s2_product"] == str(d2["file_id"].values[t])
    return samples


def test_ssl4eo_plan_and_samples(ssl4eo):
    root, inv = ssl4eo
    for split in ("train", "val"):
        items, rejects, results = run_source("ssl4eo-wds", root, split)
        quarantined = rejects + [r for r in results if isinstance(r, Rejection)]
        assert len(items) + len(rejects) == inv["splits"][split]["samples"]  # input = samples, not files
        assert dict(Counter(r.reason for r in quarantined)) == inv["quarantine"][split]
        samples = check_samples(root, inv, split, results, "S2L1C", lambda shard: "S1GRD")
        assert len(samples) + len(quarantined) == inv["splits"][split]["samples"]


def test_terramesh_pairs_each_subset_with_its_s1_folder(terramesh):
    root, inv = terramesh
    items, rejects, results = run_source("terramesh", root, "train", s2_product="L2A")
    quarantined = rejects + [r for r in results if isinstance(r, Rejection)]
    assert dict(Counter(r.reason for r in quarantined)) == inv["quarantine"]["train"] == {"missing_partner": 1,
                                                                                         "non_finite": 1}
    s1_of = {"majortom": "S1RTC", "ssl4eos12": "S1GRD"}
    samples = check_samples(root, inv, "train", results, "S2L2A", lambda shard: s1_of[inv["splits"]["train"]["subset"][shard]])
    assert {s.meta["s1_modality"] for s in samples.values()} == {"S1RTC", "S1GRD"}
    assert all(s.key.endswith("_t0") and s.meta["time_index"] == 0 for s in samples.values())


def test_a_cut_tar_keeps_what_came_before_and_reports_the_rest(tmp_path):
    inv = synthetic.make_ssl4eo_wds(tmp_path, splits={"val": 1}, samples_per_shard=3, size=12)
    path = Path(inv["splits"]["val"]["shards"]["ssl4eos12_shard_000001.tar"]["S2L1C"])
    with tarfile.open(path) as tar:
        second = tar.getmembers()[1]
    path.write_bytes(path.read_bytes()[: second.offset_data + 10])  # the second member's data is cut
    index = index_tar(fsspec.filesystem("file"), str(path))
    assert [m.key for m in index.members] == [inv["splits"]["val"]["members"]["ssl4eos12_shard_000001.tar"][0]]
    assert len(index.truncated) == 1 and "later members cannot be listed" in index.problem
    items, rejects, results = run_source("ssl4eo-wds", tmp_path, "val")
    reasons = Counter(r.reason for r in rejects)
    # location 1 kept, location 2 unreadable (4 samples), location 3 not listed in S2: its S1 member is unpaired,
    # and the cut tar itself is reported once
    assert len(items) == 4 and reasons == {"unreadable": 4 + 1, "missing_partner": 4}
    assert all(isinstance(r, Sample) for r in results)


def test_index_reads_headers_not_members(tmp_path):
    inv = synthetic.make_ssl4eo_wds(tmp_path, splits={"val": 1}, samples_per_shard=3, size=48)
    path = inv["splits"]["val"]["shards"]["ssl4eos12_shard_000001.tar"]["S2L1C"]
    data = Path(path).read_bytes()

    class CountingFS:  # an object store seen through fsspec: every read is counted
        read = 0

        def size(self, p):
            return len(data)

        def open(self, p, mode="rb", **kw):
            assert kw.get("cache_type") == "none"  # no read-ahead between headers
            fs = self

            class F(io.BytesIO):
                def read(self, n=-1):
                    out = super().read(n)
                    fs.read += len(out)
                    return out
            return F(data)

    fs = CountingFS()
    index = index_tar(fs, path)
    assert len(index.members) == 3 and index.problem is None
    assert fs.read <= 512 * 8 < len(data) // 50  # headers and the end marker only


# -- clear errors -----------------------------------------------------------------------------


def test_missing_product_folders_are_named(tmp_path):
    synthetic.make_ssl4eo_wds(tmp_path / "wds", splits={"train": 1}, samples_per_shard=1, size=12,
                              products=("S1GRD", "S2L2A"))
    with pytest.raises(FileNotFoundError) as err:
        SOURCES["ssl4eo-wds"](str(tmp_path / "wds"), SourceOptions()).available_splits()
    assert str(err.value) == f"no S2L1C/ in {tmp_path / 'wds'}; found S2L2A/: pass --s2-product L2A"
    assert product_folders(fsspec.filesystem("file"), str(tmp_path / "wds" / "train")) == ["S1GRD", "S2L2A"]

    synthetic.make_terramesh(tmp_path / "tm", splits={"train": {"majortom": 1, "ssl4eos12": 1}}, samples_per_shard=1,
                             size=12, s2_folders=("S2L2A",))
    for p in (tmp_path / "tm" / "train" / "S1GRD").iterdir():
        p.unlink()
    (tmp_path / "tm" / "train" / "S1GRD").rmdir()
    with pytest.raises(FileNotFoundError) as err:
        SOURCES["terramesh"](str(tmp_path / "tm"), SourceOptions(s2_product="L2A")).available_splits()
    assert str(err.value).startswith(f"no S1GRD/ in {tmp_path / 'tm'}; found S1RTC/, S2L2A/")
    assert "ssl4eos12_shard_*.tar" in str(err.value)

    (tmp_path / "none" / "train" / "S2L1C").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no SSL4EO-S12 v1.1 \\(WebDataset\\) tars"):
        SOURCES["ssl4eo-wds"](str(tmp_path / "none"), SourceOptions()).available_splits()


def test_commit_refuses_a_split_without_samples(tmp_path):
    """A run whose manifest would hold no sample fails with the reasons counted; the report stays, no manifest."""
    rejected = [Rejection("/a/x.tar", "x", "missing_partner")] * 3 + [Rejection("/a/y.tar", "y", "unreadable")]
    plan = SplitPlan("train", {"split": "train"}, "f" * 64, [WorkItem("k", "k", 0, {}, 1)], rejected,
                     [ShardTask(0, "train-000000.tar", [], "")], {}, 0.0)
    record = {"name": "train-000000.tar", "index": 0, "samples": 0, "bytes": 0, "sha256": None, "dtypes": {},
              "shape": None, "stats": {}, "rejections": [{"reason": "all_nodata"}]}
    with pytest.raises(PreprocessError) as err:
        commit_split(PreprocessSettings("ssl4eo-wds", "/a", str(tmp_path)), plan, {0: record},
                     SOURCES["ssl4eo-wds"]("/a", SourceOptions()), str(tmp_path))
    assert str(err.value) == (f"[train] no sample written: all 5 input samples were quarantined (missing_partner 3, "
                              f"all_nodata 1, unreadable 1); see {tmp_path}/quarantine.jsonl")
    assert not (tmp_path / "manifest.json").exists()
    lines = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in lines] == ["missing_partner"] * 3 + ["unreadable", "all_nodata"]


# -- end to end: the CLI on real Ray, local folders and S3 (moto) ------------------------------

ALL_DEFECTS = ["unreadable", "missing_partner", "wrong_shape", "non_finite", "all_nodata"]
ARCHIVES = {
    "ssl4eo-wds": lambda root: synthetic.make_ssl4eo_wds(root, splits={"train": 2, "val": 1}, samples_per_shard=3,
                                                         size=48, seed=7, defects=ALL_DEFECTS),
    "terramesh": lambda root: synthetic.make_terramesh(root, splits={"train": {"majortom": 2, "ssl4eos12": 2},
                                                                     "val": {"ssl4eos12": 1}},
                                                       samples_per_shard=3, size=48, seed=8, defects=ALL_DEFECTS),
}


def s1_folders(name, inv, split):
    if name == "ssl4eo-wds":
        return lambda shard: "S1GRD"
    return lambda shard: {"majortom": "S1RTC", "ssl4eos12": "S1GRD"}[inv["splits"][split]["subset"][shard]]


def preprocess(*args, check=True):
    return run_module("pipeline.preprocess", "--no-progress", *args, check=check)


def read_set(folder) -> tuple[dict, list[dict], dict[str, Sample]]:
    """(manifest, quarantine lines, samples by key) of a local shard set, the shards read with plain webdataset."""
    import webdataset as wds

    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    quarantine = [json.loads(line) for line in (folder / "quarantine.jsonl").read_text().splitlines()]
    samples = {}
    for s in wds.WebDataset([str(folder / sh["name"]) for sh in manifest["shards"]], shardshuffle=False).decode():
        assert s["__key__"] not in samples
        samples[s["__key__"]] = Sample(s["__key__"], s["s1.npy"], s["s2.npy"], s["json"])
    for sh in manifest["shards"]:
        data = (folder / sh["name"]).read_bytes()
        assert len(data) == sh["bytes"] and hashlib.sha256(data).hexdigest() == sh["sha256"]
    return manifest, quarantine, samples


def check_set(name, root, inv, split, folder):
    """A committed split against the generator: totals, quarantine, every value, exact statistics."""
    manifest, quarantine, samples = read_set(folder)
    assert manifest["totals"]["input_samples"] == inv["splits"][split]["samples"]
    assert manifest["totals"]["samples"] + manifest["quarantined"] == inv["splits"][split]["samples"]
    assert dict(Counter(r["reason"] for r in quarantine)) == inv["quarantine"][split]
    check_samples(root, inv, split, samples.values(), "S2L1C", s1_folders(name, inv, split))
    s2 = np.stack([s.s2 for s in samples.values()]).astype(np.float64)
    s1 = np.stack([s.s1 for s in samples.values()]).astype(np.float64)
    for b in range(13):
        v = s2[:, b][s2[:, b] != 0]
        assert manifest["stats"]["s2"]["valid_pixels"][b] == v.size
        np.testing.assert_allclose(manifest["stats"]["s2"]["mean"][b], v.mean(), rtol=1e-9)
        np.testing.assert_allclose(manifest["stats"]["s2"]["std"][b], v.std(), rtol=1e-9)
    for b in range(2):
        v = s1[:, b][np.isfinite(s1[:, b])]
        np.testing.assert_allclose(manifest["stats"]["s1"]["mean"][b], v.mean(), rtol=1e-9)
    assert manifest["source"]["name"] == name and manifest["modalities"]["s2"]["nodata"] == 0
    return manifest, quarantine


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_local_run_is_lossless_and_a_rerun_byte_identical(name, tmp_path):
    root = tmp_path / "archive"
    inv = ARCHIVES[name](root)
    out = tmp_path / "out"
    preprocess("--source", name, "--input", str(root), "--output", str(out), "--split", "all", "--workers", "2",
               "--shard-size-mb", "0.4")
    for split in ("train", "val"):
        manifest, _ = check_set(name, root, inv, split, out / split)
    assert len(json.loads((out / "train" / "manifest.json").read_text())["shards"]) > 1
    if name != "ssl4eo-wds":
        return
    again = tmp_path / "again"  # another worker count, same bytes
    preprocess("--source", name, "--input", str(root), "--output", str(again), "--split", "train", "--workers", "1",
               "--shard-size-mb", "0.4")
    first, second = (json.loads((d / "manifest.json").read_text()) for d in (out / "train", again))
    assert {k: v for k, v in first.items() if k != "run"} == {k: v for k, v in second.items() if k != "run"}
    for sh in first["shards"]:
        assert (out / "train" / sh["name"]).read_bytes() == (again / sh["name"]).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_s3_to_s3(name, tmp_path, s3_bucket):
    root = tmp_path / "archive"
    inv = ARCHIVES[name](root)
    fresh_s3fs().put(str(root), f"{s3_bucket}/archive", recursive=True)
    out_url = f"{s3_bucket}/shards"
    depth = ["--read-ahead", "1"] if name == "terramesh" else []  # and the default, 4, for the other release
    proc = preprocess("--source", name, "--input", f"{s3_bucket}/archive", "--output", out_url, "--split", "train",
                      "--workers", "2", *depth)
    local = tmp_path / "back"
    fresh_s3fs().get(out_url, str(local), recursive=True)
    manifest, quarantine = check_set(name, root, inv, "train", local)
    assert all(r["url"].startswith(f"{s3_bucket}/archive/train/") for r in quarantine)
    for text in ((local / "manifest.json").read_text(), (local / "quarantine.jsonl").read_text(), proc.stdout,
                 proc.stderr):
        assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in text and S3_ENV["AWS_ACCESS_KEY_ID"] not in text


@pytest.mark.slow
def test_a_run_that_writes_nothing_fails(tmp_path):
    root = tmp_path / "archive"
    inv = synthetic.make_ssl4eo_wds(root, splits={"train": 1}, samples_per_shard=3, size=12)
    for path in (root / "train" / "S1GRD").glob("*.tar"):
        synthetic.wds_zarr.write_tar(path, [])  # the S1 tars are there, with no member
    out = tmp_path / "out"
    proc = preprocess("--source", "ssl4eo-wds", "--input", str(root), "--output", str(out), check=False)
    n = inv["splits"]["train"]["samples"]
    assert proc.returncode == 2
    assert (f"error: [train] no sample written: all {n} input samples were quarantined (missing_partner {n}); "
            f"see {out}/quarantine.jsonl") in proc.stderr
    assert not (out / "manifest.json").exists() and len((out / "quarantine.jsonl").read_text().splitlines()) == n


def test_cli_names_the_missing_product_folder(tmp_path):
    synthetic.make_ssl4eo_wds(tmp_path / "a", splits={"train": 1}, samples_per_shard=1, size=12,
                              products=("S1GRD", "S2L2A"))
    proc = preprocess("--source", "ssl4eo-wds", "--input", str(tmp_path / "a"), "--output", str(tmp_path / "o"),
                      check=False)
    assert proc.returncode == 2
    assert f"error: no S2L1C/ in {tmp_path / 'a'}; found S2L2A/: pass --s2-product L2A" in proc.stderr
    assert not (tmp_path / "o").exists()  # stopped before any work


def test_the_zarr_source_on_a_webdataset_release_names_the_source_that_reads_it(ssl4eo, terramesh):
    """Users who read the older instructions point --source ssl4eo-zarr at today's release: say what to use."""
    with pytest.raises(FileNotFoundError) as err:
        SOURCES["ssl4eo-zarr"](str(ssl4eo[0]), SourceOptions()).available_splits()
    assert "no SSL4EO-S12 v1.1 Zarr files" in str(err.value) and "use --source ssl4eo-wds" in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        SOURCES["ssl4eo-zarr"](str(terramesh[0]), SourceOptions()).available_splits()
    assert "use --source terramesh" in str(err.value)
