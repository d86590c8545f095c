"""The steps of a split that need no Ray: the output check, planning, committing, and the manifest they write."""

from __future__ import annotations

import hashlib
import json

import pytest

from pipeline.commit import check_output, commit_split
from pipeline.job import PreprocessError, PreprocessSettings
from pipeline.manifest import Manifest, read_committed
from pipeline.plan import ShardTask, SplitPlan, plan_split
from pipeline.sources import Rejection, WorkItem

MANIFEST_KEYS = {"format", "format_version", "pipeline_version", "fingerprint", "split", "source", "settings", "shards",
                 "totals", "quarantined", "quarantine_report", "image_size", "modalities", "stats", "run"}


def settings(out, **kw) -> PreprocessSettings:
    return PreprocessSettings("ssl4eo-zarr", "/archive", str(out), **kw)


def items(n: int) -> list[WorkItem]:
    return [WorkItem(f"k{i}", f"s{i}", 0, {"i": i}, 100) for i in range(n)]


class FakeSource:
    """Just what planning and committing ask of a source: one band per modality."""

    s1_bands = ("VV",)
    s2_bands = ("B1",)

    def __init__(self, planned=(), rejected=()):
        self.planned, self.rejected = list(planned), list(rejected)

    def plan(self, split, map_fn):
        return self.planned, self.rejected

    def describe(self):
        return {"name": "fake", "version": "1", "input": "/archive"}

    def nodata(self):
        return {"s1": "non-finite", "s2": 0}


# -- the manifest built from shard records -------------------------------------------------


def _built() -> Manifest:
    shards = [{"name": "train-000000.tar", "samples": 3, "bytes": 2048, "sha256": "a" * 64, "keys": ["x"]},
              {"name": "train-000002.tar", "samples": 2, "bytes": 1024, "sha256": "b" * 64, "stats": {}}]
    modality = {"bands": ["VV"], "dtype": "float16", "units": "backscatter dB", "nodata": "non-finite",
                "member": "s1.npy", "layout": "(bands, H, W)"}
    return Manifest.build(
        split="train", source={"name": "fake"}, settings={"split": "train"}, job_fingerprint="f" * 64, shards=shards,
        input_samples=7, quarantined=2, image_size=[48, 40],
        modalities={"s1": modality, "s2": {**modality, "bands": ["B1", "B2"], "dtype": "int16", "nodata": 0}},
        stats={"s1": {"mean": [1.5], "std": [0.5]}, "s2": {"mean": [1.0, 2.0], "std": [3.0, 4.0]}},
        run={"workers": 2})


def test_manifest_build_derives_totals_and_round_trips():
    m = _built()
    body = m.to_dict()
    assert set(body) == MANIFEST_KEYS
    assert body["totals"] == {"shards": 2, "samples": 5, "bytes": 3072, "input_samples": 7, "quarantined": 2}
    assert body["quarantined"] == 2 and body["quarantine_report"] == "quarantine.jsonl"
    assert body["shards"] == [{"name": "train-000000.tar", "samples": 3, "bytes": 2048, "sha256": "a" * 64},
                              {"name": "train-000002.tar", "samples": 2, "bytes": 1024, "sha256": "b" * 64}]
    assert (body["format"], body["format_version"], body["fingerprint"]) == ("fusmae-webdataset", 1, "f" * 64)
    assert body["image_size"] == [48, 40] and body["run"] == {"workers": 2}

    again = Manifest.from_dict(json.loads(m.to_json()), url="s3://bucket/set/manifest.json")
    assert again.to_dict() == body
    assert [s.url for s in again.shards] == ["s3://bucket/set/train-000000.tar", "s3://bucket/set/train-000002.tar"]
    assert (again.image_size, again.num_samples, again.job_fingerprint) == ((48, 40), 5, "f" * 64)
    assert again.shape("s2") == (2, 48, 40) and again.bands("s2") == ["B1", "B2"]
    assert again.fingerprint == m.fingerprint


# -- check_output: is there anything to do? ------------------------------------------------


def _commit_fake(out, fingerprint, **body):
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps({"fingerprint": fingerprint, "shards": [],
                                                   "totals": {"samples": 0, "shards": 0}, **body}))


def test_check_output_on_a_fresh_folder_makes_it_ready(tmp_path):
    out = tmp_path / "out"
    (out / ".fusmae-shard-abc").mkdir(parents=True)  # left by a killed run
    (out / ".fusmae-shard-abc" / "train-000000.tar").write_bytes(b"half")
    assert check_output(settings(out), "train", str(out)) is None
    assert out.is_dir() and list(out.iterdir()) == []


def test_check_output_finds_its_own_set_even_without_samples(tmp_path, capsys):
    s = settings(tmp_path)
    _commit_fake(tmp_path, s.job_fingerprint("train"))  # every input quarantined: no shard, still done
    assert check_output(s, "train", str(tmp_path))["totals"] == {"samples": 0, "shards": 0}
    assert "(0 samples in 0 shards, checked by sha256); nothing to do." in capsys.readouterr().out


def test_check_output_refuses_a_different_set_unless_overwrite(tmp_path):
    _commit_fake(tmp_path, "0" * 64)
    (tmp_path / "train-000000.tar").write_bytes(b"old")
    with pytest.raises(PreprocessError, match="different settings; choose another --output or pass --overwrite"):
        check_output(settings(tmp_path), "train", str(tmp_path))
    assert (tmp_path / "manifest.json").exists()
    assert check_output(settings(tmp_path, overwrite=True), "train", str(tmp_path)) is None
    assert not (tmp_path / "manifest.json").exists()  # uncommitted; old shards go only once the new set commits
    assert (tmp_path / "train-000000.tar").read_bytes() == b"old"


def test_check_output_treats_an_unreadable_manifest_as_a_different_set(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(PreprocessError, match="not valid JSON.*pass --overwrite"):
        check_output(settings(tmp_path), "train", str(tmp_path))
    assert check_output(settings(tmp_path, overwrite=True), "train", str(tmp_path)) is None
    assert read_committed(str(tmp_path)) is None


# -- plan_split ----------------------------------------------------------------------------


def test_plan_packs_names_and_finds_reusable_shards(tmp_path, capsys):
    source = FakeSource(items(5), [Rejection("/archive/x", "x", "unreadable")])
    s = settings(tmp_path, samples_per_shard=2)
    plan = plan_split(s, source, "train", str(tmp_path), map_fn=None)
    assert [(t.index, t.name, [it.key for it in t.items]) for t in plan.tasks] == [
        (0, "train-000000.tar", ["k0", "k1"]), (1, "train-000001.tar", ["k2", "k3"]), (2, "train-000002.tar", ["k4"])]
    assert len({t.fingerprint for t in plan.tasks}) == 3 and plan.reused == {} and plan.input_samples == 6
    assert "[train] planned 5 samples in 3 shards (1 rejected while listing)" in capsys.readouterr().out

    # shard 1 finished by an earlier run; shard 0's record belongs to another plan
    tar = b"x" * 1536
    (tmp_path / "_progress").mkdir()
    (tmp_path / "train-000001.tar").write_bytes(tar)
    done = {"fingerprint": plan.tasks[1].fingerprint, "samples": 2, "bytes": 1536,
            "sha256": hashlib.sha256(tar).hexdigest()}
    (tmp_path / "_progress" / "train-000001.tar.json").write_text(json.dumps(done))
    (tmp_path / "train-000000.tar").write_bytes(tar)
    (tmp_path / "_progress" / "train-000000.tar.json").write_text(json.dumps({**done, "fingerprint": "other"}))
    again = plan_split(s, source, "train", str(tmp_path), map_fn=None)
    assert again.reused == {1: done} and [t.index for t in again.todo] == [0, 2]
    assert "[train] reusing 1 shards completed by an earlier run" in capsys.readouterr().out

    (tmp_path / "train-000001.tar").write_bytes(b"y" * 1536)  # same size, other bytes
    assert plan_split(s, source, "train", str(tmp_path), map_fn=None).reused == {}
    assert plan_split(settings(tmp_path, samples_per_shard=2, verify_existing="size"), source, "train",
                      str(tmp_path), map_fn=None).reused == {1: done}


def test_plan_of_an_empty_split_is_an_error(tmp_path):
    with pytest.raises(PreprocessError, match="/archive: no samples found for split 'val'"):
        plan_split(settings(tmp_path), FakeSource(), "val", str(tmp_path), map_fn=None)


# -- commit_split --------------------------------------------------------------------------


def _record(index, samples, mean, rejections=()):
    name = f"train-{index:06d}.tar"
    moments = {"count": [4 if samples else 0], "mean": [mean], "m2": [4.0 if samples else 0.0]}
    return {"name": name, "index": index, "samples": samples, "bytes": 1024 * samples,
            "sha256": (str(index) * 64) if samples else None, "dtypes": {"s1": "float16", "s2": "int16"},
            "shape": [8, 8], "stats": {"s1": moments, "s2": moments},
            "rejections": [{"reason": r} for r in rejections]}


def _plan(n_items, rejections, tasks):
    return SplitPlan("train", {"split": "train"}, "f" * 64, items(n_items), rejections,
                     [ShardTask(i, f"train-{i:06d}.tar", [], "") for i in range(tasks)], {}, 0.0)


def test_commit_combines_in_shard_order_and_writes_the_manifest(tmp_path):
    # 7 items read (3 + 1 + 3) and 1 rejected while listing; each shard lost one sample to quarantine
    plan = _plan(7, [Rejection("/archive/bad", "bad", "unreadable")], 3)
    records = {2: _record(2, 2, 3.0, ["all_nodata"]), 0: _record(0, 2, 1.0, ["wrong_shape"]),
               1: _record(1, 0, 0.0, ["non_finite"])}  # in the order the tasks finished
    manifest = commit_split(settings(tmp_path), plan, records, FakeSource(), str(tmp_path))
    body = json.loads((tmp_path / "manifest.json").read_text())
    assert set(body) == MANIFEST_KEYS and set(body["run"]) == {"created", "argv", "workers", "seconds"}
    assert body["totals"] == {"shards": 2, "samples": 4, "bytes": 4096, "input_samples": 8, "quarantined": 4}
    assert body["quarantined"] == 4 and body["fingerprint"] == "f" * 64 and body["settings"] == {"split": "train"}
    assert [s["name"] for s in body["shards"]] == ["train-000000.tar", "train-000002.tar"]
    # (4 pixels at mean 1, m2 4) merged with (4 at mean 3, m2 4): mean 2, m2 16, population std sqrt(16 / 8)
    assert body["stats"]["s1"] == {"bands": ["VV"], "mean": [2.0], "std": [1.4142135623730951], "valid_pixels": [8]}
    assert body["image_size"] == [8, 8] and body["modalities"]["s2"]["dtype"] == "int16"
    assert body["modalities"]["s2"]["nodata"] == 0 and body["source"] == {"name": "fake", "version": "1",
                                                                           "input": "/archive"}
    lines = (tmp_path / "quarantine.jsonl").read_text().splitlines()
    assert [json.loads(line)["reason"] for line in lines] == ["unreadable", "wrong_shape", "non_finite", "all_nodata"]
    assert manifest.to_dict() == body


def test_commit_refuses_when_inputs_are_not_accounted_for(tmp_path):
    plan = _plan(5, [], 2)  # 5 inputs, but the records account for 2 + 2
    with pytest.raises(PreprocessError, match=r"internal accounting error: 5 inputs, 4 written, 0 quarantined"):
        commit_split(settings(tmp_path), plan, {0: _record(0, 2, 1.0), 1: _record(1, 2, 3.0)}, FakeSource(),
                     str(tmp_path))
    assert not (tmp_path / "manifest.json").exists()


def test_commit_with_overwrite_removes_shards_the_new_plan_did_not_write(tmp_path):
    for name in ("train-000000.tar", "train-000001.tar", "train-000007.tar", "val-000001.tar"):
        (tmp_path / name).write_bytes(b"old")
    commit_split(settings(tmp_path, overwrite=True), _plan(2, [], 1), {0: _record(0, 2, 1.0)}, FakeSource(),
                 str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "val-000001.tar"]
