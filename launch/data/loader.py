"""The loaders of one rank: an infinite, resumable training stream and one-pass evaluation reads.

Every sample a rank sees in training is a pure function of (seed, shard set,
world size, streams per rank, micro batch size, batches consumed): see
`launch.data.plan` for the arithmetic. That makes exact resumption and equal
step counts on every rank possible.

Usage on rank r of a DeepSpeed job::

    manifest = load_manifest(cfg.data.manifest, cfg.data.storage_options)
    loader = ShardLoader(manifest, LoaderSettings.from_config(cfg.data), rank=r, world_size=W,
                         micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed)
    loader.load_state_dict(checkpoint["loader"])          # when resuming
    augment = DeviceAugment.for_manifest(manifest, cfg.data.image_size).to(device)
    for batch in loader:                                  # infinite
        s1, s2, nonfinite = augment(batch, device)        # (B, 2, S, S), (B, C, S, S) float32, normalised

A batch is a dict: ``s1`` (B, 2, H, W) and ``s2`` (B, C, H, W) in the shards' raw
dtypes (uint16 becomes int32), ``keys``, ``crop`` (B, 4) float32 boxes (y0, x0, h, w)
in fractions of the image, ``flip`` (B, 2) bool (horizontal, vertical), ``epoch``,
``worker``, ``batch_index``, ``skipped_shards`` / ``skipped_samples`` (cumulative per
worker); a `PassLoader` batch also has ``meta`` (with ``with_meta``) and
``positions`` [(shard name, byte offset)], and no arrays in a metadata-only pass.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Optional

import torch
from torch.utils.data import DataLoader

from launch.data import plan
from launch.data.buffers import ReleaseTracker
from launch.data.reader import DEFAULT_BLOCK_SIZE, ReadSpec, Selection
from launch.data.streams import LoaderError, PassStream, StreamSpec, TrainStream, _Stream
from pipeline.manifest import Manifest

log = logging.getLogger("launch.data.loader")

BATCH_SLOTS = 8
"""Batches per worker whose shared memory is reused (`launch.data.buffers`): those in flight
(``prefetch_factor``), the one the trainer holds, and room for a few it keeps longer."""

@dataclass(frozen=True)
class LoaderSettings:
    """How a rank reads (not what): workers, shuffling, augmentation draws, cache, store options."""

    num_workers: int = 2
    """K loader processes per rank (0: in the calling process, one stream)."""
    shuffle_buffer: int = 256
    crop_scale_min: float = 0.35
    hflip: bool = True
    vflip: bool = True
    cache_dir: Optional[str] = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    block_size: int = DEFAULT_BLOCK_SIZE
    prefetch_factor: int = 2
    pin_memory: Optional[bool] = None
    """None: when a GPU is present."""
    multiprocessing_context: Optional[str] = None
    """'fork' (default on Linux), 'spawn' or 'forkserver'."""
    timeout: float = 0.0
    """Seconds the DataLoader waits for a batch before raising (0: forever)."""

    @classmethod
    def from_config(cls, data: Any, **overrides: Any) -> "LoaderSettings":
        """From a `launch.config.DataConfig` (or its evaluation extension): the one mapping of its fields."""
        return cls(num_workers=data.num_workers, shuffle_buffer=data.shuffle_buffer,
                   crop_scale_min=data.crop_scale_min, hflip=data.hflip, vflip=data.vflip,
                   cache_dir=data.cache_dir, storage_options=dict(data.storage_options), **overrides)

    @property
    def streams(self) -> int:
        return max(1, self.num_workers)


def _read_spec(manifest: Manifest, settings: LoaderSettings, rank: int, selection: Optional[Selection],
               images: bool, with_meta: bool) -> ReadSpec:
    shards, offsets, fingerprint = manifest.shards, None, manifest.fingerprint
    if selection is not None:
        unknown = sorted(set(selection.offsets) - {s.name for s in shards})
        if unknown:
            raise LoaderError(f"the selection names shards {unknown[:3]} that {manifest.shown} does not list")
        shards = tuple(s for s in manifest.shards if selection.offsets.get(s.name))
        offsets = tuple(selection.offsets[s.name] for s in shards)
        fingerprint = f"{fingerprint}-{selection.digest()[:16]}"
    return ReadSpec(shards=shards, fingerprint=fingerprint, s1_shape=manifest.shape("s1"),
                    s2_shape=manifest.shape("s2"), s1_dtype=str(manifest.dtype("s1")),
                    s2_dtype=str(manifest.dtype("s2")), rank=rank, images=images, with_meta=with_meta,
                    offsets=offsets, cache_dir=settings.cache_dir, storage_options=dict(settings.storage_options),
                    block_size=settings.block_size)


def _keep(batch: Any) -> Any:
    """collate_fn for batch_size=None: batches arrive collated."""
    return batch


def _sync_environ(environ: dict[str, str], worker_id: int) -> None:
    """Give a worker the trainer's environment as of the DataLoader's creation.

    A forkserver child inherits the server's environment from when the server started,
    which can predate variables the trainer set later (AWS_ENDPOINT_URL, credentials).
    """
    for key in set(os.environ) - set(environ):
        del os.environ[key]
    os.environ.update(environ)


def default_multiprocessing_context() -> str:
    """fork where available (PyTorch's own default on Linux): workers start at once and are children of
    the rank, so they exit with it when a launcher kills the rank. A forkserver's workers are children of
    the server instead and outlive a killed rank. spawn elsewhere."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


# -- the rank's loaders ------------------------------------------------------------------------


class _RankLoader:
    """What both loaders share: the stream spec, the DataLoader around it, per-worker skip counts."""

    def __init__(self, manifest: Manifest, settings: LoaderSettings, spec: StreamSpec):
        self.manifest, self.settings, self.spec = manifest, settings, spec
        self.num_workers = settings.num_workers
        self.pin_memory = torch.cuda.is_available() if settings.pin_memory is None else settings.pin_memory
        self.multiprocessing_context = settings.multiprocessing_context or default_multiprocessing_context()
        self._skipped: dict[int, tuple[int, int]] = {}

    @property
    def skipped(self) -> dict[str, int]:
        """Shard failures and lost samples reported by this rank's workers (summed; since this loader started)."""
        return {"shards": sum(v[0] for v in self._skipped.values()),
                "samples": sum(v[1] for v in self._skipped.values())}

    def _dataloader(self, dataset: _Stream, persistent: bool) -> tuple[DataLoader, Optional[ReleaseTracker]]:
        """A DataLoader over ``dataset`` and the tracker of its workers' batch memory (None in-process). Each
        DataLoader has its own: two live iterators of one loader must not release each other's slots."""
        if self.num_workers == 0:
            return DataLoader(dataset, batch_size=None, collate_fn=_keep, pin_memory=self.pin_memory), None
        # The workers' batch pools reuse a batch's shared memory once this process no longer references it.
        tracker = ReleaseTracker(self.num_workers, BATCH_SLOTS, resend=self.pin_memory)
        dataset.released, dataset.resend = tracker.released, self.pin_memory
        ctx = multiprocessing.get_context(self.multiprocessing_context)
        if self.multiprocessing_context == "forkserver":
            # The server imports the main module and the loader once; each worker then forks from
            # it in milliseconds instead of importing torch (and the trainer's imports) again.
            ctx.set_forkserver_preload(["__main__", "launch.data.loader"])
        return DataLoader(
            dataset, batch_size=None, collate_fn=_keep, num_workers=self.num_workers,
            prefetch_factor=self.settings.prefetch_factor, persistent_workers=persistent,
            pin_memory=self.pin_memory, multiprocessing_context=ctx,
            worker_init_fn=functools.partial(_sync_environ, dict(os.environ)), timeout=self.settings.timeout,
        ), tracker

    def _receive(self, batch: dict[str, Any], tracker: Optional[ReleaseTracker]) -> dict[str, Any]:
        if tracker is not None:
            tracker.receive(batch)
        batch.pop("buffer", None)
        for msg in batch.pop("warnings", ()):
            log.warning("loader worker %d: %s", batch["worker"], msg)
        self._skipped[batch["worker"]] = (batch["skipped_shards"], batch["skipped_samples"])
        return batch


STATE_KEYS = ("batches", "rank", "world_size", "num_workers", "micro_batch_size", "seed", "shuffle_buffer",
              "manifest_fingerprint")
LAYOUT = ("world_size", "num_workers", "micro_batch_size", "seed", "shuffle_buffer")


class ShardLoader(_RankLoader):
    """The training micro batches of one rank, forever, with a resumable position.

    ``state_dict()`` after consuming b batches and ``load_state_dict`` in a new loader
    make its next batch batch b of an uninterrupted run. ``selection`` restricts the
    stream to a subset of the samples (only their bytes are read).
    """

    def __init__(self, manifest: Manifest, settings: Optional[LoaderSettings] = None, *, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, start_batch: int = 0,
                 selection: Optional[Selection] = None):
        settings = settings or LoaderSettings()
        _check_layout(micro_batch_size, rank, world_size, settings, seed, start_batch)
        read = _read_spec(manifest, settings, rank, selection, images=True, with_meta=False)
        n = int(read.counts().sum())
        if n < world_size * settings.streams:
            what = "selected samples" if selection is not None else "samples"
            raise ValueError(f"{manifest.shown} has {n} {what}, fewer than world_size x num_workers "
                             f"= {world_size * settings.streams}: some stream would have none")
        spec = StreamSpec(read, world_size, settings.streams, micro_batch_size, seed, max(1, settings.shuffle_buffer),
                          settings.crop_scale_min, settings.hflip, settings.vflip)
        super().__init__(manifest, settings, spec)
        self._batches = start_batch
        self._generation = 0

    @property
    def batches(self) -> int:
        """Micro batches this rank has consumed (yielded) so far."""
        return self._batches

    @property
    def samples_consumed(self) -> int:
        """Samples all ranks have consumed together (every rank consumes the same number of batches)."""
        s = self.spec
        return s.origin_samples + (self._batches - s.origin_batches) * s.micro_batch_size * s.world_size

    def state_dict(self) -> dict[str, Any]:
        s = self.spec
        return {"batches": self._batches, "rank": s.rank, "world_size": s.world_size, "num_workers": s.num_workers,
                "micro_batch_size": s.micro_batch_size, "seed": s.seed, "shuffle_buffer": s.shuffle_buffer,
                "manifest_fingerprint": s.read.fingerprint, "origin_batches": s.origin_batches,
                "origin_samples": s.origin_samples, "samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where ``state`` (from any rank of the saving run) left off.

        Same world size, workers, micro batch, seed and shuffle buffer: the next batch is
        exactly the one the saving run would have produced. Otherwise: continue at the same
        fraction of the global sample stream (samples consumed by all ranks), with a warning.
        Another shard set (or selection): `LoaderError`.
        """
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise LoaderError(f"loader state lacks {missing}")
        s = self.spec
        if state["manifest_fingerprint"] != s.read.fingerprint:
            raise LoaderError(
                f"the loader state was saved for another shard set "
                f"(fingerprint {state['manifest_fingerprint'][:12]}…); "
                f"{self.manifest.shown} has {s.read.fingerprint[:12]}…. Resume with the same manifest, "
                "or start the data position fresh (drop the dataloader state)")
        batches = int(state["batches"])
        origin_batches = int(state.get("origin_batches", 0))
        origin_samples = int(state.get("origin_samples", 0))
        saved = {k: max(1, int(state[k])) if k == "num_workers" else int(state[k]) for k in LAYOUT}
        ours = {k: getattr(s, k) for k in LAYOUT}
        if saved != ours:
            # Global samples consumed by the saving run; the new layout starts every stream at that
            # epoch and the same fraction of its range, counting batches on from the saved count.
            consumed = origin_samples + (batches - origin_batches) * saved["micro_batch_size"] * saved["world_size"]
            changed = {k: (saved[k], ours[k]) for k in LAYOUT if saved[k] != ours[k]}
            epoch, offset = divmod(consumed, s.num_samples)
            log.warning("loader state from another layout %s: continuing at epoch %d, %.1f%% through (%d samples "
                        "consumed by all ranks); batches are not identical to an uninterrupted run",
                        changed, epoch, 100.0 * offset / s.num_samples, consumed)
            origin_batches, origin_samples = batches, consumed
        self.spec = replace(s, origin_batches=origin_batches, origin_samples=origin_samples)
        self._batches = batches
        self._generation += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        generation = self._generation
        # One DataLoader iterator lives for the whole run and a restart needs workers that start at a
        # new position, so persistent workers buy nothing.
        loader, tracker = self._dataloader(TrainStream(replace(self.spec, start_batch=self._batches)), persistent=False)
        for batch in loader:
            if generation != self._generation:
                raise LoaderError("load_state_dict was called during iteration; iterate the loader anew")
            self._batches += 1
            yield self._receive(batch, tracker)


class PassLoader(_RankLoader):
    """One pass over this rank's part of a shard set (or of a `Selection`), in manifest order.

    ``images=False`` reads keys, positions and the json members only (a metadata pass:
    the arrays' bytes are skipped). Iterating again reuses the workers.
    """

    def __init__(self, manifest: Manifest, settings: Optional[LoaderSettings] = None, *, batch_size: int,
                 rank: int = 0, world_size: int = 1, with_meta: bool = True, images: bool = True,
                 selection: Optional[Selection] = None):
        settings = settings or LoaderSettings()
        _check_layout(batch_size, rank, world_size, settings, 0, 0)
        read = _read_spec(manifest, settings, rank, selection, images=images, with_meta=with_meta)
        super().__init__(manifest, settings, StreamSpec(read, world_size, settings.streams, batch_size))
        self._loader: Optional[tuple[DataLoader, Optional[ReleaseTracker]]] = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._loader is None:
            # persistent workers: torch gives every iteration the one iterator (reset), so one tracker serves
            self._loader = self._dataloader(PassStream(self.spec), persistent=True)
        loader, tracker = self._loader
        for batch in loader:
            yield self._receive(batch, tracker)

    def __len__(self) -> int:
        """Batches of this rank in the pass (without unreadable shards)."""
        s = self.spec
        total = 0
        for k in range(s.num_workers):
            lo, hi = plan.stream_range(s.num_samples, s.rank, s.world_size, k, s.num_workers)
            total += -(-(hi - lo) // s.micro_batch_size)
        return total


def _check_layout(batch: int, rank: int, world_size: int, settings: LoaderSettings, seed: int, start: int) -> None:
    if batch < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {batch}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if settings.num_workers < 0 or seed < 0 or start < 0:
        raise ValueError("num_workers, seed and start_batch must be >= 0")

