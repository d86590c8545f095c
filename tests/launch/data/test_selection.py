"""Reading a subset by key: a metadata pass gives positions, a `Selection` reads only those samples."""

from __future__ import annotations

import itertools

import pytest

from launch.data.loader import LoaderSettings, PassLoader, ShardLoader
from launch.data.reader import Selection
from pipeline.manifest import load_manifest
from shardfactory import make_shard_set

SIZES = [6, 2, 9, 5]  # N = 22


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return load_manifest(make_shard_set(str(tmp_path_factory.mktemp("sel")), SIZES, hw=32, s2_channels=13,
                                        labels=True))


def metadata(manifest, **kw):
    """Every sample's key, json and position, from a pass that reads no arrays."""
    out = []
    for b in PassLoader(manifest, LoaderSettings(num_workers=0), batch_size=4, images=False, **kw):
        assert "s1" not in b and "s2" not in b
        out += list(zip(b["keys"], b["meta"], b["positions"]))
    return out


def read_chars() -> int:
    """Bytes this process has read through read() calls so far (the kernel's count, /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_metadata_pass_lists_every_sample_with_its_position(manifest):
    rows = metadata(manifest)
    assert [k for k, _, _ in rows] == [f"sample_{i:06d}" for i in range(22)]  # the factory's keys, in order
    assert [m["number"] for _, m, _ in rows] == list(range(22))
    shards = [s.name for s in manifest.shards]
    assert [p[0] for _, _, p in rows] == [shards[i] for i, n in enumerate(SIZES) for _ in range(n)]
    assert [p[1] for _, _, p in rows][:2] == [0, rows[1][2][1]] and rows[1][2][1] > 0  # first sample at byte 0


def test_a_selection_reads_exactly_the_selected_samples(manifest):
    rows = metadata(manifest)
    chosen = [1, 7, 8, 15, 21]
    sel = Selection.of([rows[i][2] for i in chosen])
    assert sel.num_samples == 5
    batches = list(PassLoader(manifest, LoaderSettings(num_workers=2), batch_size=2, selection=sel))
    got = sorted(int(b["s2"][i, 0, 0, 0]) for b in batches for i in range(len(b["keys"])))
    assert got == chosen  # the factory writes each sample's number into s2[0, 0, 0]
    assert sum(b["skipped_shards"] for b in batches) == 0


def test_training_on_a_selection_sees_each_selected_sample_once_per_epoch(manifest):
    rows = metadata(manifest)
    chosen = [0, 3, 9, 10, 11, 12, 19, 20]
    sel = Selection.of([rows[i][2] for i in chosen])
    seen = []
    for rank in range(2):
        loader = ShardLoader(manifest, LoaderSettings(num_workers=2, shuffle_buffer=3), micro_batch_size=2,
                             rank=rank, world_size=2, seed=3, selection=sel)
        it = iter(loader)
        batches = list(itertools.islice(it, 2))  # 2 streams x 2 samples x 1 batch: one epoch of 4 per rank
        it.close()
        seen += [int(v) for b in batches for v in b["s2"][:, 0, 0, 0]]
    assert sorted(seen) == chosen
    state = loader.state_dict()
    whole = ShardLoader(manifest, LoaderSettings(num_workers=0), micro_batch_size=2)
    assert state["manifest_fingerprint"] != whole.state_dict()["manifest_fingerprint"]  # a subset is its own stream


def test_a_small_selection_reads_a_small_part_of_the_bytes(manifest):
    rows = metadata(manifest)
    settings = LoaderSettings(num_workers=0)
    before = read_chars()
    assert sum(len(b["keys"]) for b in PassLoader(manifest, settings, batch_size=4, with_meta=False)) == 22
    whole = read_chars() - before
    before = read_chars()
    sel = Selection.of([rows[i][2] for i in (4, 16)])
    assert sum(len(b["keys"]) for b in PassLoader(manifest, settings, batch_size=4, selection=sel)) == 2
    part = read_chars() - before
    shard_bytes = sum(s.bytes for s in manifest.shards)
    assert whole >= shard_bytes * 0.9  # the full pass reads (about) every byte of the shards
    print(f"read {part} of {whole} bytes ({part / whole:.3f})")
    assert part < whole * 0.25, (part, whole)  # 2 of 22 samples: their bytes plus buffered headers


def test_a_selection_naming_unknown_shards_is_refused(manifest):
    from launch.data.loader import LoaderError

    with pytest.raises(LoaderError, match="does not list"):
        PassLoader(manifest, batch_size=2, selection=Selection({"other-000000.tar": (0,)}))
