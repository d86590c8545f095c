"""The loader's reused memory (`launch.data.buffers`): batch slots come back only once nothing holds them, a
batch or a row the consumer keeps is never written again, and a local shard's arrays go straight into the batch.

Every factory sample carries its number in ``s2[0, 0, 0]`` and in its key, so a batch whose memory was written
again by a later batch shows it: its numbers no longer match its keys.
"""

from __future__ import annotations

import itertools
import logging
import os

import numpy as np
import pytest
import torch

from launch.data.loader import BATCH_SLOTS, LoaderSettings, PassLoader, ShardLoader
from launch.data.reader import ArrayAt, ReadSpec, ShardReader
from pipeline.manifest import load_manifest
from shardfactory import make_shard_set


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return make_shard_set(str(tmp_path_factory.mktemp("buffers")), [9, 7, 8, 6], hw=8, s2_channels=3)


def key_numbers(batch) -> list[int]:
    return [int(k.split("_")[1]) for k in batch["keys"]]


def numbers(batch) -> list[int]:
    return batch["s2"][:, 0, 0, 0].tolist()


def loader(url: str, workers: int, **kw) -> ShardLoader:
    settings = LoaderSettings(num_workers=workers, shuffle_buffer=kw.pop("shuffle_buffer", 5),
                              pin_memory=kw.pop("pin_memory", None), multiprocessing_context=kw.pop("context", None))
    return ShardLoader(load_manifest(url), settings, micro_batch_size=kw.pop("mb", 3), seed=kw.pop("seed", 2), **kw)


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
@pytest.mark.parametrize("workers, pin", [(0, False), (2, False), (2, True)], ids=["in-process", "workers", "pinned"])
def test_batches_the_consumer_keeps_are_never_written_again(shards, workers, pin):
    # pinned: the arrays travel with every batch (a GPU's pinning thread copies them before the trainer sees them);
    # on a CPU-only torch the DataLoader skips the copy, so the shared memory itself reaches the test
    it = iter(loader(shards, workers, pin_memory=pin))
    kept = list(itertools.islice(it, 4 * BATCH_SLOTS))  # more than the pool's slots: it must allocate past them
    it.close()
    assert all(numbers(b) == key_numbers(b) for b in kept)
    assert len({x for b in kept for x in key_numbers(b)}) == 30  # 4 epochs of 30 samples went by


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
@pytest.mark.parametrize("workers, pin, context", [(0, False, None), (2, False, None), (2, True, None),
                                                   (2, False, "spawn")],
                         ids=["in-process", "workers", "pinned", "spawn"])
def test_memory_is_reused_once_the_consumer_lets_go_and_a_kept_row_keeps_its_slot(shards, workers, pin, context):
    # spawn: the release array reaches the workers pickled (torch shares its memory), not inherited by fork
    it = iter(loader(shards, workers, pin_memory=pin, context=context))
    first = next(it)
    row, want = first["s2"][1], key_numbers(first)[1]  # a view of one row outlives its batch
    del first
    storages, checked = set(), 0
    for batch in itertools.islice(it, 60):
        assert numbers(batch) == key_numbers(batch)  # as it arrives: nothing wrote into it meanwhile
        storages.add(batch["s2"].untyped_storage().data_ptr())
        checked += 1
    it.close()
    assert checked == 60
    assert int(row[0, 0, 0]) == want
    # 60 batches from a handful of slots per stream: the memory is reused, not allocated per batch
    assert len(storages) <= max(1, workers) * BATCH_SLOTS < 60


@pytest.mark.timeout(120)
def test_a_persistent_pass_loader_gives_the_same_batches_every_pass(shards):
    pass_loader = PassLoader(load_manifest(shards), LoaderSettings(num_workers=2), batch_size=4)
    passes = [[(b["keys"], b["s2"].clone(), b["s1"].clone()) for b in pass_loader] for _ in range(3)]
    assert sorted(int(k.split("_")[1]) for keys, _, _ in passes[0] for k in keys) == list(range(30))
    for again in passes[1:]:
        assert [k for k, _, _ in again] == [k for k, _, _ in passes[0]]
        assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(again, passes[0]))


def test_a_local_shard_changed_after_its_check_loses_the_sample_with_a_warning(tmp_path, caplog):
    url = make_shard_set(str(tmp_path), [4], hw=8, s2_channels=3)
    manifest = load_manifest(url)
    spec = ReadSpec(shards=manifest.shards, fingerprint=manifest.fingerprint, s1_shape=manifest.shape("s1"),
                    s2_shape=manifest.shape("s2"), s1_dtype=str(manifest.dtype("s1")),
                    s2_dtype=str(manifest.dtype("s2")))
    reader = ShardReader(spec)
    rows = {"s1": np.empty((2, 8, 8), np.float32), "s2": np.empty((3, 8, 8), np.int16)}
    samples = reader.slots(np.arange(1), 0, 4)
    first = next(samples)
    assert isinstance(first.s2, ArrayAt)  # located, not read: the bytes go straight into the row
    assert reader.copy_into(first, rows) and int(rows["s2"][0, 0, 0]) == 0
    second = next(samples)
    os.truncate(second.s2.path, second.s2.offset + 10)
    with caplog.at_level(logging.WARNING, logger="launch.data"):
        assert not reader.copy_into(second, rows)
    assert reader.skipped_samples == 1
    assert second.key in caplog.text and "changed after it was checked" in caplog.text
    reader.close()


def test_passes_leave_no_shard_file_open(shards):
    # a stream keeps a few local shards open for its reads (the shuffle block spans shards) and closes them with
    # itself: an evaluation that makes many passes must not run out of file descriptors
    loader = PassLoader(load_manifest(shards), LoaderSettings(num_workers=0), batch_size=4)
    open_files = []
    for _ in range(4):
        assert sum(len(b["keys"]) for b in loader) == 30
        open_files.append(len(os.listdir("/proc/self/fd")))
    assert open_files == [open_files[0]] * 4
    it = iter(loader)
    next(it)
    assert len(os.listdir("/proc/self/fd")) > open_files[0]  # mid-pass: the shard being read is open
    it.close()
    assert len(os.listdir("/proc/self/fd")) == open_files[0]


@pytest.mark.timeout(120)
def test_two_live_iterators_of_one_loader_keep_their_own_batch_memory(shards):
    # each iteration has its own workers, pools and release tracker: interleaved, neither sees the other's pixels
    shard_loader = loader(shards, 2, pin_memory=False)
    first, second = iter(shard_loader), iter(shard_loader)
    for it in (first, second):
        for _ in range(4):
            next(it)
    for _ in range(20):
        for it in (first, second):
            batch = next(it)
            assert numbers(batch) == key_numbers(batch)
    first.close()
    second.close()


def test_a_transient_read_error_on_a_local_shard_is_retried_not_skipped(shards, monkeypatch):
    # a network file system's timeout is an outage, not corruption: the same samples arrive, none is skipped
    import errno

    real, calls = os.preadv, itertools.count()

    def flaky(fd, buffers, offset):
        if next(calls) in (3, 4):
            raise TimeoutError(errno.ETIMEDOUT, "Connection timed out")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", flaky)
    pass_loader = PassLoader(load_manifest(shards), LoaderSettings(num_workers=0), batch_size=4)
    batches = list(pass_loader)
    assert sorted(x for b in batches for x in key_numbers(b)) == list(range(30)) and next(calls) > 60
    assert all(numbers(b) == key_numbers(b) for b in batches) and pass_loader.skipped["samples"] == 0


def test_a_pass_whose_last_samples_are_lost_yields_no_empty_batch(shards, monkeypatch):
    from launch.data.reader import ShardReader

    real = ShardReader.copy_into

    def lose_the_last_two(self, raw, rows):
        if raw.key in ("sample_000028", "sample_000029"):
            self.skipped_samples += 1
            return False
        return real(self, raw, rows)

    monkeypatch.setattr(ShardReader, "copy_into", lose_the_last_two)
    sizes = [len(b["keys"]) for b in PassLoader(load_manifest(shards), LoaderSettings(num_workers=0), batch_size=4)]
    assert sizes == [4] * 7  # 28 samples in 7 full batches; the batch the last two would have begun is not sent
