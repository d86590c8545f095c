"""The rank loaders: exactly-once epochs, exact resumption, bad shards, S3 and the cache, one-pass reads.

Ranks are simulated by building one loader per rank in the same test; loaders with
workers run real DataLoader worker processes (fork, the default on Linux).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fresh_s3fs
from launch.data.loader import LoaderError, LoaderSettings, PassLoader
from launch.data.loader import ShardLoader as _ShardLoader
from pipeline.manifest import load_manifest
from pipeline.shards import encode_npy
from shardfactory import make_shard_set

UNEVEN = [7, 1, 4, 9, 2, 5]  # N = 28
SETTINGS = {f.name for f in __import__("dataclasses").fields(LoaderSettings)}


def ShardLoader(url: str, **kw) -> _ShardLoader:  # noqa: N802 - reads like the class in the tests below
    """The training loader of the shard set at ``url``; keyword arguments of `LoaderSettings` go there."""
    settings = LoaderSettings(**{k: kw.pop(k) for k in list(kw) if k in SETTINGS})
    return _ShardLoader(load_manifest(url), settings, **kw)


def pass_loader(url: str, **kw) -> PassLoader:
    settings = LoaderSettings(**{k: kw.pop(k) for k in list(kw) if k in SETTINGS})
    return PassLoader(load_manifest(url), settings, **kw)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    return make_shard_set(str(tmp_path_factory.mktemp("uneven")), UNEVEN, hw=8, s2_channels=4, labels=True)


def numbers(batch) -> list[int]:
    """Global sample numbers of a batch (the factory writes them into s2[:, 0, 0, 0])."""
    return batch["s2"][:, 0, 0, 0].tolist()


def take(loader: ShardLoader, n: int) -> list[dict]:
    it = iter(loader)
    try:
        return list(itertools.islice(it, n))
    finally:
        it.close()  # shuts the worker processes down now


def stream_lengths(n: int, world_size: int, streams: int) -> list[list[int]]:
    """Samples per epoch of each (rank, stream), np.array_split sizes, computed independently of the loader."""
    return [[len(part) for part in np.array_split(np.arange(len(rank)), streams)]
            for rank in np.array_split(np.arange(n), world_size)]


def epochs_of(batches: list[dict], streams: int, lengths: list[int], count: int) -> list[list[int]]:
    """Per epoch, the samples of one rank: batch b is stream b % K's; each stream's epoch is `length` samples."""
    per_stream: list[list[int]] = [[] for _ in range(streams)]
    for b, batch in enumerate(batches):
        assert batch["worker"] == b % streams
        per_stream[b % streams] += numbers(batch)
    return [[x for k in range(streams) for x in per_stream[k][e * lengths[k]:(e + 1) * lengths[k]]]
            for e in range(count)]


# -- sampling ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size,workers,mb", [(1, 0, 4), (2, 2, 3), (3, 2, 5)])
def test_every_sample_once_per_epoch(uneven, world_size, workers, mb):
    n, K, epochs = sum(UNEVEN), max(1, workers), 3
    lengths = stream_lengths(n, world_size, K)
    steps = K * -(-epochs * max(max(ls) for ls in lengths) // mb)
    per_epoch: list[list[int]] = [[] for _ in range(epochs)]
    for rank in range(world_size):
        loader = ShardLoader(uneven, micro_batch_size=mb, rank=rank, world_size=world_size, num_workers=workers,
                             seed=7, shuffle_buffer=4)
        batches = take(loader, steps)
        assert len(batches) == steps and all(len(b["keys"]) == mb for b in batches)  # equal steps, full batches
        assert loader.batches == steps
        for e, samples in enumerate(epochs_of(batches, K, lengths[rank], epochs)):
            per_epoch[e] += samples
    for samples in per_epoch:
        assert sorted(samples) == list(range(n))
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]


def test_order_is_seeded(uneven):
    def first_epoch(seed):
        return epochs_of(take(ShardLoader(uneven, micro_batch_size=4, num_workers=0, seed=seed), 7), 1, [28], 1)[0]

    a, b, c = first_epoch(1), first_epoch(1), first_epoch(2)
    assert a == b and a != c and sorted(a) == sorted(c) == list(range(28))


def test_raw_dtypes_and_uint16(tmp_path):
    url = make_shard_set(str(tmp_path), [3, 2], hw=8, s2_channels=3, s1_dtype="float16", s2_dtype="uint16")
    (batch,) = take(ShardLoader(url, micro_batch_size=5, num_workers=0, shuffle_buffer=1), 1)
    assert batch["s1"].dtype == torch.float16 and batch["s1"].shape == (5, 2, 8, 8)
    assert batch["s2"].dtype == torch.int32 and batch["s2"].shape == (5, 3, 8, 8)  # uint16 held exactly as int32
    assert batch["crop"].dtype == torch.float32 and batch["crop"].shape == (5, 4)
    assert batch["flip"].dtype == torch.bool and batch["flip"].shape == (5, 2)
    assert "meta" not in batch and batch["keys"][0].startswith("sample_")
    y0, x0, h, w = batch["crop"].unbind(1)
    assert ((h > 0) & (w > 0) & (y0 >= 0) & (x0 >= 0) & (y0 + h <= 1 + 1e-6) & (x0 + w <= 1 + 1e-6)).all()


# -- resumption -------------------------------------------------------------------------------


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["keys"] == w["keys"]
        for name in ("s1", "s2", "crop", "flip"):
            assert torch.equal(g[name], w[name]), name


@pytest.mark.timeout(120)
def test_exact_resumption_with_workers(uneven):
    kw = dict(micro_batch_size=3, rank=1, world_size=2, num_workers=2, seed=3, shuffle_buffer=4)
    reference = ShardLoader(uneven, **kw)
    it = iter(reference)
    ref, states = [], [reference.state_dict()]
    for _ in range(16):
        ref.append(next(it))
        states.append(reference.state_dict())
    it.close()
    # Rank 1 holds 14 samples: streams of 7 per epoch, blocks of 4. Stream k has consumed
    # ceil((b - k) / 2) * 3 samples at batch b: b=3 is mid-block in both streams, b=5 and b=6
    # resume inside a batch that straddles epochs 0/1, b=11 is in epoch 2.
    for b in (1, 3, 5, 6, 11):
        resumed = ShardLoader(uneven, **kw)
        resumed.load_state_dict(states[b])
        assert resumed.batches == b
        assert_same_batches(take(resumed, 5), ref[b:b + 5])
    assert_same_batches(take(ShardLoader(uneven, start_batch=4, **kw), 3), ref[4:7])
    assert states[16]["batches"] == 16 and states[16]["manifest_fingerprint"] == load_manifest(uneven).fingerprint


def test_resume_at_other_world_size(uneven, caplog):
    old = [ShardLoader(uneven, micro_batch_size=2, rank=r, world_size=2, num_workers=0, seed=5) for r in range(2)]
    for loader in old:
        take(loader, 5)  # 5 batches x 2 samples x 2 ranks = 20 of 28 samples of epoch 0
    state = old[0].state_dict()
    remainder: list[int] = []
    with caplog.at_level(logging.WARNING, logger="launch.data"):
        for rank in range(3):
            loader = ShardLoader(uneven, micro_batch_size=2, rank=rank, world_size=3, num_workers=0, seed=5)
            loader.load_state_dict(state)
            assert loader.samples_consumed == 20
            batches = take(loader, 6)
            assert batches[0]["epoch"] == 0 and batches[-1]["epoch"] == 1
            # Batches straddle epochs: collect the epoch-0 samples by position in this rank's stream.
            length = [len(p) for p in np.array_split(np.arange(28), 3)][rank]
            start = 20 * length // 28
            flat = [x for b in batches for x in numbers(b)]
            remainder += flat[:length - start]
    assert "not identical" in caplog.text
    assert len(remainder) == len(set(remainder)) == 28 - sum(20 * n // 28 for n in (10, 9, 9))
    new = ShardLoader(uneven, micro_batch_size=2, rank=0, world_size=3, num_workers=0, seed=5)
    new.load_state_dict(state)
    follow = new.state_dict()
    again = ShardLoader(uneven, micro_batch_size=2, rank=0, world_size=3, num_workers=0, seed=5)
    again.load_state_dict(follow)  # same layout now: exact
    assert_same_batches(take(again, 3), take(new, 3))


def test_state_of_another_shard_set_is_refused(uneven, tmp_path):
    other = make_shard_set(str(tmp_path), [3, 3], hw=8, s2_channels=4)
    state = ShardLoader(other, micro_batch_size=2, num_workers=0).state_dict()
    with pytest.raises(LoaderError, match="another shard set"):
        ShardLoader(uneven, micro_batch_size=2, num_workers=0).load_state_dict(state)


# -- bad shards -------------------------------------------------------------------------------


def replace_shard(manifest_url: str, index: int, data: bytes) -> None:
    """Overwrite shard ``index`` with ``data`` and update its manifest entry (bytes, sha256)."""
    path = Path(manifest_url)
    manifest = json.loads(path.read_text())
    entry = manifest["shards"][index]
    (path.parent / entry["name"]).write_bytes(data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    path.write_text(json.dumps(manifest))


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.timeout(120)
def test_bad_shards_are_skipped_and_counted(tmp_path, caplog):
    # Shards 1-5 go bad (20 slots); each stream's 22 slots per epoch always hold good ones.
    url = make_shard_set(str(tmp_path), [6, 4, 4, 4, 4, 4, 6, 6, 6], hw=8, s2_channels=4)
    folder = tmp_path
    names = [s["name"] for s in json.loads(Path(url).read_text())["shards"]]
    truncated = (folder / names[1]).read_bytes()
    replace_shard(url, 1, truncated[: len(truncated) // 2])
    replace_shard(url, 2, os.urandom(5000))
    os.remove(folder / names[3])
    s1 = encode_npy(np.zeros((2, 8, 8), np.float32))
    good_s2 = encode_npy(np.full((4, 8, 8), 17, np.int16))
    wrong_s2 = encode_npy(np.zeros((3, 8, 8), np.int16))  # 3 bands where the manifest says 4

    def members(keys, s2):
        return [(f"{k}.{m}", d) for k in keys for m, d in (("json", b"{}"), ("s1.npy", s1), ("s2.npy", s2))]

    replace_shard(url, 4, tar_of([("a.json", b"{}"), ("a.s1.npy", s1)] + members("bcd", good_s2)))  # 'a' lacks s2
    replace_shard(url, 5, tar_of(members("abcd", wrong_s2)))
    with caplog.at_level(logging.WARNING, logger="launch.data"):
        loader = ShardLoader(url, micro_batch_size=2, num_workers=2, shuffle_buffer=3, seed=1)
        batches = take(loader, 30)
    seen = {x for b in batches for x in numbers(b)}
    good = set(range(6)) | set(range(26, 44))
    assert seen - good <= {6, 7, 8}  # besides good shards, at most the head of the truncated one
    assert good <= seen
    assert loader.skipped["shards"] >= 5 and loader.skipped["samples"] >= 16
    assert batches[-1]["skipped_shards"] >= 1
    for name in names[1:6]:
        assert name in caplog.text


@pytest.mark.timeout(120)
def test_all_shards_bad_raises(tmp_path):
    url = make_shard_set(str(tmp_path), [3, 3], hw=8, s2_channels=4)
    for i in range(2):
        replace_shard(url, i, b"not a tar at all" * 100)
    with pytest.raises(LoaderError, match="read no sample"):
        take(ShardLoader(url, micro_batch_size=2, num_workers=2), 1)


# -- object storage and the local cache --------------------------------------------------------


@pytest.mark.slow  # starts the S3 server process
@pytest.mark.timeout(120)
def test_s3_matches_local_and_cache_serves_later_epochs(tmp_path, s3_bucket):
    sizes = [5, 3, 6, 2]
    local = make_shard_set(str(tmp_path / "local"), sizes, hw=8, s2_channels=4, seed=11)
    remote = make_shard_set(f"{s3_bucket}/shards", sizes, hw=8, s2_channels=4, seed=11)
    kw = dict(micro_batch_size=2, num_workers=2, seed=4, shuffle_buffer=3)
    want = take(ShardLoader(local, **kw), 24)  # 3 epochs of 16 samples
    assert_same_batches(take(ShardLoader(remote, **kw), 12), want[:12])

    cache = tmp_path / "cache"
    cached = ShardLoader(remote, cache_dir=str(cache), **kw)
    it = iter(cached)
    first = [next(it) for _ in range(10)]  # more than one epoch per stream: every shard was read
    manifest = load_manifest(remote)
    for shard in manifest.shards:
        copy = cache / manifest.fingerprint / shard.name
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == shard.sha256
    fresh_s3fs().rm(f"{s3_bucket}/shards", recursive=True)  # later epochs can only come from the cache
    rest = [next(it) for _ in range(14)]
    it.close()
    assert_same_batches(first + rest, want)
    assert cached.skipped == {"shards": 0, "samples": 0}


# -- one pass (evaluation) --------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_finite_pass_is_exact_with_meta(uneven):
    seen: list[int] = []
    for rank in range(2):
        loader = pass_loader(uneven, batch_size=3, rank=rank, world_size=2, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert [numbers(b) for b in list(loader)] == [numbers(b) for b in batches]  # a second pass, same workers
        for b in batches:
            assert [m["number"] for m in b["meta"]] == numbers(b) and all("labels" in m for m in b["meta"])
            assert torch.equal(b["crop"], torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(b["keys"]), 4))
            assert not b["flip"].any()
        seen += [x for b in batches for x in numbers(b)]
    assert sorted(seen) == list(range(sum(UNEVEN)))
