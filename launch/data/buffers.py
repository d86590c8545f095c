"""Memory the loader reuses: the shuffle buffer's sample bytes and the batches' arrays.

A loader that allocates for every sample and batch spends more time on first touches
than on copying: a new 16 MB batch in shared memory costs about 4,000 page faults (the
kernel zeroes every 4 KiB page before the copy can write it), about 18 times the copy
itself on the 2-core CI machine (`bench/bench_loader.py`). So:

- `SampleArena` holds the member bytes of the samples a stream keeps (its shuffle
  buffer): each sample's ``.npy`` members are read straight into a slot (``readinto``)
  that is written again ``slots`` samples later;
- `BatchPool` hands out batch arrays (S1 and S2 of one batch in one storage; shared
  memory in a DataLoader worker) and takes a slot back only once nothing in the process
  that received the batch references it, which `ReleaseTracker` observes there: the
  storage's use count drops to the tracker's own reference. A consumer that keeps a batch,
  or a view of one row, keeps its slot; the pool then allocates another, up to a bound,
  and past it fresh storage that is never reused. Nothing waits, nothing is overwritten.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import get_worker_info

NPY_HEADER_ROOM = 4096
"""Bytes a slot keeps for an ``.npy`` header beyond the array (numpy writes 128, at most 65,535 for v1 headers)."""
_ALIGN = 64


def _use_count(storage: torch.UntypedStorage) -> int:
    return torch._C._storage_Use_Count(storage._cdata)


class SampleArena:
    """``slots`` ring slots of raw member bytes (one region per array member), reused in turn.

    The reader writes the sample it is reading into `current` and calls `advance` once the
    sample is complete; a sample's arrays stay valid until ``slots`` more samples were read.
    """

    def __init__(self, slots: int, member_bytes: dict[str, int]):
        self.slots = max(1, slots)
        self._offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for ext, nbytes in member_bytes.items():
            room = -(-(nbytes + NPY_HEADER_ROOM) // _ALIGN) * _ALIGN
            self._offsets[ext] = (pos, room)
            pos += room
        self.slot_bytes = pos
        self._memory: Optional[memoryview] = None  # allocated at the first read: a metadata pass never needs it
        self._slot = 0

    def region(self, ext: str, size: int) -> Optional[memoryview]:
        """Where member ``ext`` of ``size`` bytes of the current sample goes; None if not an array member or too big
        (a member larger than the manifest's shape allows is then read as bytes, and its shape check fails)."""
        placed = self._offsets.get(ext)
        if placed is None or size > placed[1]:
            return None
        if self._memory is None:
            self._memory = memoryview(np.empty(self.slots * self.slot_bytes, dtype=np.uint8)).cast("B")
        start = self._slot * self.slot_bytes + placed[0]
        return self._memory[start:start + placed[1]]

    def advance(self) -> None:
        self._slot = (self._slot + 1) % self.slots


_GENERATIONS = itertools.count(1)
"""Batch generations of this process, across its pools: a persistent worker's next pass starts a new pool whose
slots must not look released by the previous pool's batches."""


class BatchPool:
    """Batch arrays for one stream, reused once the receiving side let go of them (see the module docstring)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype], rows: int,
                 released: Optional[torch.Tensor] = None, max_slots: int = 6):
        self.rows = rows
        self._layout: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        pos = 0
        for name, shape in shapes.items():
            dtype = dtypes[name]
            pos = -(-pos // _ALIGN) * _ALIGN
            self._layout[name] = (pos, dtype, shape)
            pos += rows * math.prod(shape) * dtype.itemsize
        self.nbytes = max(1, pos)
        info = get_worker_info()
        self.worker = info.id if info is not None else None
        self.released = released
        """(workers, max_slots) int64 in shared memory, written by the main process's `ReleaseTracker`;
        None in-process, where a slot is free once its storage's use count is back to the pool's one reference."""
        self.max_slots = max_slots if released is None else min(max_slots, int(released.shape[1]))
        self._slots: list[torch.UntypedStorage] = []
        self._sent: list[int] = []
        """Per slot, the generation of the batch last handed out from it."""
        self._unsent: Optional[tuple[int, int]] = None

    def take(self, rows: int) -> tuple[dict[str, torch.Tensor], Optional[tuple[int, int, int]], bool]:
        """Arrays for a batch of ``rows`` (<= the pool's rows), the tag (worker, slot, generation) the receiving
        side releases them by (None: not pooled), and whether the slot is new (the receiver has not seen it)."""
        slot, new = self._free_slot(), False
        if slot is None and len(self._slots) < self.max_slots:
            self._slots.append(self._new_storage())
            self._sent.append(0)
            slot, new = len(self._slots) - 1, True
        if slot is None:  # every slot is still referenced: a one-off storage, never reused
            return self._views(self._new_storage(), rows), None, True
        self._unsent = (slot, self._sent[slot])
        self._sent[slot] = next(_GENERATIONS)
        tag = None if self.worker is None else (self.worker, slot, self._sent[slot])
        return self._views(self._slots[slot], rows), tag, new

    def cancel(self) -> None:
        """Give back the slot of the last `take` unsent (its batch came out empty): free again at once."""
        if self._unsent is not None:
            slot, generation = self._unsent
            self._sent[slot] = generation
            self._unsent = None

    def _free_slot(self) -> Optional[int]:
        for slot, storage in enumerate(self._slots):
            if self.released is None:
                if _use_count(storage) == 1:
                    return slot
            elif int(self.released[self.worker, slot]) >= self._sent[slot]:  # type: ignore[index]
                return slot
        return None

    def _new_storage(self) -> torch.UntypedStorage:
        if self.worker is not None:  # directly in shared memory: the hand-over to the main process copies nothing
            return torch.UntypedStorage._new_shared(self.nbytes)
        return torch.UntypedStorage(self.nbytes)

    def _views(self, storage: torch.UntypedStorage, rows: int) -> dict[str, torch.Tensor]:
        return {name: _view(storage, offset // dtype.itemsize, dtype, (rows, *shape))
                for name, (offset, dtype, shape) in self._layout.items()}


def _view(storage: torch.UntypedStorage, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(0, dtype=dtype).set_(storage, offset, shape)


ARRAY_KEYS = ("s1", "s2")


class ReleaseTracker:
    """The main process's side of the workers' `BatchPool`s.

    A worker sends a slot's storage (a file descriptor) with the slot's first batch only; the
    tracker keeps it mapped and rebuilds the arrays of the slot's later batches from the tag
    (no descriptor passing per batch). It marks a slot released once nothing but its own
    reference holds the storage. With ``resend`` (pinned batches: the pinning thread copies
    them before this process sees them) the arrays travel with every batch and the tracker
    watches the storages it receives instead.
    """

    def __init__(self, workers: int, max_slots: int, resend: bool = False):
        self.released = torch.zeros((max(1, workers), max_slots), dtype=torch.int64).share_memory_()
        self.resend = resend
        self._slots: dict[tuple[int, int], tuple[torch.UntypedStorage, list[tuple[str, int, torch.dtype, tuple]]]] = {}
        self._held: dict[tuple[int, int], tuple[int, list[torch.UntypedStorage]]] = {}
        """(worker, slot) -> (generation, storages to watch) of batches handed on and not released yet."""

    def receive(self, batch: dict[str, Any]) -> None:
        """Complete a batch that arrived (its ``buffer`` tag is removed) and release the earlier ones let go of since."""
        tag = batch.pop("buffer", None)
        self.sweep()
        if tag is None:
            return
        worker, slot, generation, rows = tag
        key = (worker, slot)
        arrays = [k for k in ARRAY_KEYS if isinstance(batch.get(k), torch.Tensor)]
        if self.resend:
            storages = {id(st): st for st in (batch[k].untyped_storage() for k in arrays)}
            self._held[key] = (generation, list(storages.values()))
            return
        if arrays:  # the slot's first batch: keep its storage mapped
            storage = batch[arrays[0]].untyped_storage()
            if any(batch[k].untyped_storage().data_ptr() != storage.data_ptr() for k in arrays):
                raise RuntimeError("a pooled batch's arrays arrived in separate storages")
            self._slots[key] = (storage, [(k, batch[k].storage_offset(), batch[k].dtype, tuple(batch[k].shape[1:]))
                                          for k in arrays])
        else:
            storage, layout = self._slots[key]
            for name, offset, dtype, shape in layout:
                batch[name] = _view(storage, offset, dtype, (rows, *shape))
        self._held[key] = (generation, [self._slots[key][0]])

    def sweep(self) -> None:
        """Release every held batch whose storages nothing but this tracker references any more."""
        # A storage's Python object holds one reference however often it is referenced from Python (the slot
        # cache and this list share it); each tensor on it holds one more.
        free = [(key, gen) for key, (gen, storages) in self._held.items() if all(_use_count(s) == 1 for s in storages)]
        for key, generation in free:  # after dropping the references: the worker may write the slot again
            del self._held[key]
            self.released[key] = generation
