"""GeoTIFF trees are listed in pieces (`pipeline.sources.listing`): the driver lists one level, inventory tasks the
rest. The plan must not depend on how the tree is cut, must hold exactly what the archive holds (and report what
it lacks), and must list through an object store that fails now and then."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import fresh_s3fs

from pipeline import synthetic
from pipeline.shards import make_key
from pipeline.sources import SOURCES, SourceOptions, bigearthnet, sen12ms, ssl4eo_tiff
from pipeline.sources.listing import find_all, groups, subfolders

GROUP_SIZE = {"ssl4eo-tiff": (ssl4eo_tiff, "LOCATIONS_PER_TASK"), "bigearthnet": (bigearthnet, "PATCHES_PER_TASK"),
              "sen12ms": (sen12ms, "SCENES_PER_TASK")}
MISSING_S1_LOCATION = "0000002"


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """The three GeoTIFF layouts, each with samples whose partner is missing; {source: (root, expected)} where
    expected is {split: (sample keys in plan order, {rejected key: detail})}."""
    base = tmp_path_factory.mktemp("trees")
    out = {}

    root = base / "ssl4eo"
    info = synthetic.make_ssl4eo_tiff(root, n_locations=5, size=24, seed=3, missing_s1=(MISSING_S1_LOCATION,))
    keys = [make_key(loc, f"t{t}") for loc in sorted(info["locations"]) if loc != MISSING_S1_LOCATION
            for t in range(4)]
    rejected = {make_key(MISSING_S1_LOCATION, f"t{t}"): "no S1 product" for t in range(4)}
    out["ssl4eo-tiff"] = (root, {"train": (keys, rejected)})

    root = base / "ben"
    info = synthetic.make_bigearthnet(root, n_patches=9, size=24, seed=4)
    rows = pq.read_table(root / "metadata.parquet").to_pylist()
    no_s2, no_s1 = rows[0], rows[1]  # one patch loses its S2 folder, another its S1 folder
    shutil.rmtree(root / bigearthnet.S2_ROOT / bigearthnet.s2_tile(no_s2["patch_id"]) / no_s2["patch_id"])
    shutil.rmtree(root / bigearthnet.S1_ROOT / bigearthnet.s1_tile(no_s1["s1_name"]) / no_s1["s1_name"])
    expected = {}
    for split in info["splits"]:
        pids = sorted(r["patch_id"] for r in rows if r["split"] == split)
        gone = {no_s2["patch_id"]: "no S2 folder", no_s1["patch_id"]: f"no S1 folder {no_s1['s1_name']}"}
        expected[split] = ([make_key(p) for p in pids if p not in gone],
                           {make_key(p): d for p, d in gone.items() if p in pids})
    out["bigearthnet"] = (root, expected)

    root = base / "sen12ms"
    info = synthetic.make_sen12ms(root, n_scenes=4, patches_per_scene=3, size=32, seed=5)
    lost = info["splits"]["train"][4]
    os.remove(info["files"][lost]["lc"])
    expected = {split: ([make_key(p) for p in pids if p != lost], {make_key(lost): "no lc file"} if lost in pids else {})
                for split, pids in info["splits"].items()}
    out["sen12ms"] = (root, expected)
    return out


def _plan(source: str, url: str, split: str, options: SourceOptions | None = None, cached: list | None = None):
    """(items as (key, refs, est_bytes), rejections as (reason, key, detail), number of inventory jobs); the
    listings the source's filesystem still caches afterwards are appended to ``cached``."""
    jobs = []

    def serial(fn, args):
        results = [fn(a) for a in args]
        jobs.extend(results)
        return results

    reader = SOURCES[source](url, options or SourceOptions())
    items, rejects = reader.plan(split, serial)
    if cached is not None:
        cached.extend(k for k in reader.fs.dircache if k.startswith(reader.root))
    return ([(it.key, it.refs, it.est_bytes) for it in items],
            sorted((r.reason, r.key, r.detail) for r in rejects), len(jobs))


@pytest.mark.parametrize("source", sorted(GROUP_SIZE))
def test_the_plan_does_not_depend_on_how_the_tree_is_cut(archives, source, monkeypatch):
    root, expected = archives[source]
    module, constant = GROUP_SIZE[source]
    cuts = 0
    for split, (keys, rejected) in expected.items():
        monkeypatch.setattr(module, constant, 10**6)
        whole, whole_rejects, whole_jobs = _plan(source, str(root), split)
        monkeypatch.setattr(module, constant, 1)
        cut, cut_rejects, cut_jobs = _plan(source, str(root), split)
        assert whole_jobs == 1
        cuts += cut_jobs
        assert cut == whole and cut_rejects == whole_rejects
        # what the archive holds, in plan order, and what it lacks, each once
        assert [k for k, _, _ in cut] == keys
        assert sorted(key for _, key, _ in cut_rejects) == sorted(rejected)
        for reason, key, detail in cut_rejects:
            assert reason == "missing_partner" and rejected[key] in detail
        sizes = {est for _, _, est in cut}
        assert len(sizes) == 1 and sizes.pop() > 24 * 24 * 14  # every group estimated from its own first sample
    assert cuts > len(expected)  # some split was really cut into several inventory jobs


def test_listing_helpers_on_a_local_tree(tmp_path):
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "a" / "x" / "1.tif").write_bytes(b"1")
    (tmp_path / "a" / "2.tif").write_bytes(b"2")
    (tmp_path / "b").mkdir()
    import fsspec

    fs = fsspec.filesystem("file")
    assert subfolders(fs, str(tmp_path)) == ["a", "b"] and subfolders(fs, str(tmp_path / "nope")) == []
    assert find_all(fs, [str(tmp_path / "a"), str(tmp_path / "nope")]) == {
        str(tmp_path / "a"): ["2.tif", "x/1.tif"], str(tmp_path / "nope"): []}
    # a URL with its protocol names the same folders
    assert subfolders(fs, f"file://{tmp_path}") == ["a", "b"]
    assert find_all(fs, [f"file://{tmp_path}/a"]) == {f"file://{tmp_path}/a": ["2.tif", "x/1.tif"]}
    assert list(groups(range(5), 2)) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="at least one"):
        list(groups([1], 0))


@pytest.mark.parametrize("source", sorted(GROUP_SIZE))
def test_listing_an_object_store_that_fails_now_and_then(archives, source, s3_bucket, store_proxy, monkeypatch):
    """The same plan from S3, cut into one-entry groups (many listings in flight), through a proxy that is down for
    the first 4 s (longer than s3fs's own retries last) and answers one new connection in four with 503 SlowDown:
    every listing is retried until it succeeds, none is lost or taken for an empty folder, and none stays cached."""
    root, expected = archives[source]
    url = f"{s3_bucket}/{source}"
    fresh_s3fs().put(str(root), url, recursive=True)
    module, constant = GROUP_SIZE[source]
    monkeypatch.setattr(module, constant, 1)
    store_proxy.faults(0.25, "slowdown")
    # no retries below ours (botocore's, s3fs's): each fault reaches the listing's own retry (`retrying`)
    options = SourceOptions(storage_options={"skip_instance_cache": True, "endpoint_url": store_proxy.url,
                                             "config_kwargs": {"retries": {"max_attempts": 1}}})
    store_proxy.outage(4.0)
    cached: list[str] = []
    for split, (keys, rejected) in expected.items():
        items, rejects, _ = _plan(source, url, split, options, cached)
        assert [k for k, _, _ in items] == keys
        assert sorted(key for _, key, _ in rejects) == sorted(rejected)
        assert all(refs[ref].startswith(url.removeprefix("s3://")) for _, refs, _ in items for ref in refs
                   if ref in ("s1_dir", "s2_dir", "s1", "s2", "lc"))
    assert store_proxy.refused > 0
    # s3fs keeps every listing for the life of its filesystem object (shared within a process): listed folders
    # are forgotten at once, or a Ray worker listing millions of files would hold ~1 KB for each
    assert cached == []


def test_sen12ms_scene_folders_are_listed_under_their_own_names(archives, tmp_path):
    """A scene folder named with leading zeros ('s1_00123') is scene 123: found under its own name, with and without
    split lists, never dropped."""
    root, expected = archives["sen12ms"]
    padded = tmp_path / "padded"
    shutil.copytree(root, padded)
    season = next(p for p in sorted(padded.iterdir()) if p.is_dir())
    renamed = 0
    for folder in sorted(season.iterdir()):
        mod, number = folder.name.split("_")
        folder.rename(season / f"{mod}_{int(number):05d}")
        renamed += 1
    assert renamed == 3
    for split, (keys, rejected) in expected.items():
        items, rejects, _ = _plan("sen12ms", str(padded), split)
        assert [k for k, _, _ in items] == keys and sorted(k for _, k, _ in rejects) == sorted(rejected)
    for name in sen12ms.SPLIT_FILES.values():
        (padded / name).unlink(missing_ok=True)
        (padded / "splits" / name).unlink(missing_ok=True)
    items, rejects, _ = _plan("sen12ms", str(padded), "train")
    every = sorted(k for keys, _ in expected.values() for k in keys)
    assert sorted(k for k, _, _ in items) == every and len(rejects) == 1
