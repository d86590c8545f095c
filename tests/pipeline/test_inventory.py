"""What planning keeps on the driver (`pipeline.inventory`): chunks of planned samples cut into the same shards,
with the same fingerprints, however they were chunked; exact duplicate keys from key hashes; and, on a real Ray
instance, items left in the object store that the shard tasks fetch themselves."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from pipeline import inventory
from pipeline.inventory import PlannedItems
from pipeline.plan import pack_shards, shard_tasks
from pipeline.sources.base import WorkItem


def make_items(keys, est=10):
    return [WorkItem(k, k.split("_")[0], 0, {"file": f"f{i // 4}.zarr.zip", "i": i}, est + i % 3)
            for i, k in enumerate(keys)]


@pytest.mark.parametrize("cuts", [[], [5], [1, 2, 11, 12], list(range(1, 25))])
def test_any_chunking_gives_the_shards_and_fingerprints_of_the_plain_list(cuts):
    items = make_items([f"loc{i}_t0" for i in range(25)])
    bounds = [0, *cuts, len(items)]
    planned = PlannedItems([items[a:b] for a, b in zip(bounds, bounds[1:])])
    whole = PlannedItems([items])
    assert len(planned) == 25 and list(planned) == items and planned[7] == items[7] and planned[-1] == items[-1]
    tasks, reference = shard_tasks("job", "train", planned, 35, 100), shard_tasks("job", "train", whole, 35, 100)
    assert [t.work_items() for t in tasks] == pack_shards(items, 35, 100)  # the cut the shard format always had
    assert [t.fingerprint for t in tasks] == [t.fingerprint for t in reference]
    assert len({t.fingerprint for t in tasks}) == len(tasks)
    assert shard_tasks("other job", "train", planned, 35, 100)[0].fingerprint != tasks[0].fingerprint
    moved = make_items([f"loc{i}_t0" for i in range(25)])
    moved[3].refs["i"] = 99  # another reference, same key: another shard
    changed = [a.fingerprint != b.fingerprint
               for a, b in zip(shard_tasks("job", "train", PlannedItems([moved]), 35, 100), tasks)]
    assert changed == [False, True] + [False] * (len(tasks) - 2)  # item 3 is in the second shard


@pytest.mark.parametrize("collide", [False, True], ids=["hashes", "every-hash-colliding"])
def test_duplicate_keys_are_found_across_chunks_and_exactly(monkeypatch, collide):
    if collide:  # every key hashes alike: the check must still compare the keys themselves
        monkeypatch.setattr(inventory, "key_hash", lambda key: 7)
    keys = ["a_t0", "b_t0", "c_t0", "a_t0", "d_t0", "b_t0", "a_t0", "e_t0"]
    items = make_items(keys)
    planned = PlannedItems([items[:2], items[2:5], items[5:]])
    found = planned.duplicates()
    assert [(p, it.key) for p, it in found] == [(3, "a_t0"), (5, "b_t0"), (6, "a_t0")]
    planned.drop([p for p, _ in found])
    assert [it.key for it in planned] == ["a_t0", "b_t0", "c_t0", "d_t0", "e_t0"]
    assert [it.refs["i"] for it in planned] == [0, 1, 2, 4, 7]  # the first of each key is the one kept
    assert planned.duplicates() == [] and len(planned.est_bytes()) == 5


def test_the_driver_keeps_32_bytes_a_sample_whatever_the_items_hold():
    items = make_items([f"loc{i}_t{t}" for i in range(64) for t in range(4)])
    for it in items:
        it.refs["meta"] = {"product": "S2A_MSIL1C_20200101T000000_N0500_R000_T00XXX_20200101T000000" * 4}
    assert PlannedItems([items]).driver_bytes() == 256 * 32


RAY_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from pipeline.inventory import ChunkPart, PlannedItems, ray_inventory
    from pipeline.plan import shard_tasks
    from pipeline.sources.base import Rejection, WorkItem

    def inventory(n):  # one input file: 3 samples, one rejection
        items = [WorkItem(f"f{n}_{i}", f"f{n}", i, {"file": n, "i": i, "meta": {"x": [n] * 50}}, 100) for i in range(3)]
        return items, [Rejection(f"/in/f{n}", f"f{n}", "unreadable", "a test", f"f{n}_9", 9)]

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    planned = PlannedItems()
    rejections = []
    for chunk, rej in ray_inventory(inventory, list(range(5))):
        planned.add(chunk)
        rejections += rej
    tasks = shard_tasks("job", "train", planned, 450, 100)

    @ray.remote
    def shard_task(task):  # what build_shard does first
        return [(it.key, it.refs["i"]) for it in task.work_items()]

    print(json.dumps({
        "remote": [c.remote for c in planned.chunks],
        "summary_bytes": planned.driver_bytes(),
        "parts_are_refs": all(isinstance(p, ChunkPart) for t in tasks for p in t.items),
        "shards": ray.get([shard_task.remote(t) for t in tasks]),
        "rejections": [r.sample_id for r in rejections],
    }))
    ray.shutdown()
""")


@pytest.mark.timeout(180)
def test_on_ray_the_items_stay_in_the_object_store_and_shard_tasks_fetch_them():
    proc = subprocess.run([sys.executable, "-c", RAY_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["remote"] == [True] * 5 and out["parts_are_refs"]
    assert out["summary_bytes"] == 15 * 32  # what the driver holds: 32 bytes a sample, whatever the items hold
    keys = [key for shard in out["shards"] for key, _ in shard]
    assert keys == [f"f{n}_{i}" for n in range(5) for i in range(3)]
    assert [len(s) for s in out["shards"]] == [4, 4, 4, 3]  # 100-byte samples, 450-byte shards
    assert out["rejections"] == [f"f{n}" for n in range(5)]
