"""The label fraction: a seeded, stratified subset of the training split, and where its samples are.

The subset is chosen from the labels of every training sample sorted by key (a metadata
pass, `launch.evaluation.data.TrainIndex`), so it is the same for any number of processes;
`TrainSubset.selection` then names the chosen samples by (shard, byte offset), and the
loaders read only their bytes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from launch.data.reader import Selection


def subset_size(n: int, fraction: float) -> int:
    """round(fraction x n) (halves up), at least 1."""
    return n if fraction >= 1.0 else max(1, min(n, int(math.floor(fraction * n + 0.5))))


def select_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices of a stratified subset of ``subset_size(N, fraction)`` multi-label samples.

    labels: (N, C) 0/1, rows in a fixed order (the training split sorted by key). Deterministic
    in (labels, fraction, seed).

    1. Coverage: while some class present in ``labels`` has no sample in the subset and the size
       allows, take a sample of the rarest uncovered class, preferring samples that carry the most
       uncovered classes (a greedy set cover), ties in a seeded random order.
    2. Iterative stratification (Sechidis et al., 2011) of the rest into two folds, the subset and
       the remainder, with target sizes that make the subset exactly the requested size: the rarest
       remaining label first, each of its samples to the fold that still wants that label most.
    """
    labels = np.asarray(labels).astype(bool)
    N, C = labels.shape
    n = subset_size(N, fraction)
    if n >= N:
        return np.arange(N)
    rng = np.random.default_rng([seed, N, n])
    priority = np.empty(N, dtype=np.int64)
    priority[rng.permutation(N)] = np.arange(N)  # the seeded random order that breaks every tie
    chosen = _cover_every_class(labels, n, priority)
    assigned = _stratify(labels, chosen, fraction, n, priority, rng)
    return np.flatnonzero(chosen | (assigned == 0))


def _cover_every_class(labels: np.ndarray, n: int, priority: np.ndarray) -> np.ndarray:
    """Step 1 of `select_subset`: a greedy cover of the present classes within ``n`` samples."""
    N = len(labels)
    counts = labels.sum(0)
    chosen = np.zeros(N, dtype=bool)
    uncovered = counts > 0
    while uncovered.any() and chosen.sum() < n:
        c = int(np.argmin(np.where(uncovered, counts, np.iinfo(np.int64).max)))
        cand = np.flatnonzero(labels[:, c] & ~chosen)
        gain = labels[cand][:, uncovered].sum(1)
        best = cand[np.lexsort((priority[cand], -gain))[0]]
        chosen[best] = True
        uncovered &= ~labels[best]
    return chosen


def _stratify(labels: np.ndarray, chosen: np.ndarray, fraction: float, n: int, priority: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
    """Step 2 of `select_subset`: the fold (0: subset, 1: the rest, -1: unassigned) of every sample."""
    N = len(labels)
    counts = labels.sum(0)
    # Remaining wishes per fold and class, and remaining sizes (0: subset, 1: the rest).
    want = np.stack([fraction * counts - labels[chosen].sum(0), (1 - fraction) * counts]).astype(np.float64)
    size = np.array([n - chosen.sum(), N - n], dtype=np.int64)
    free = ~chosen
    assigned = np.full(N, -1, dtype=np.int64)
    while True:
        pool = free & labels.any(1)
        if not pool.any():
            break
        left = labels[pool].sum(0)
        c = int(np.argmin(np.where(left > 0, left, np.iinfo(np.int64).max)))
        members = np.flatnonzero(pool & labels[:, c])
        for i in members[np.argsort(priority[members])]:
            if size[0] == 0 or size[1] == 0:
                fold = 1 if size[0] == 0 else 0
            elif want[0, c] != want[1, c]:  # the fold that wants this label most
                fold = int(want[1, c] > want[0, c])
            elif size[0] != size[1]:  # then the fold that wants the most samples
                fold = int(size[1] > size[0])
            else:
                fold = int(rng.random() >= fraction)
            assigned[i] = fold
            want[fold, labels[i]] -= 1
            size[fold] -= 1
            free[i] = False
    # Samples without any label fill what is left of the subset, in the seeded order.
    rest = np.flatnonzero(free)
    rest = rest[np.argsort(priority[rest])]
    assigned[rest[: size[0]]] = 0
    return assigned


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def describe_subset(labels: np.ndarray, idx: np.ndarray, keys: list[str], fraction: float, seed: int) -> dict[str, Any]:
    """What results.json records of the subset: its size, of how many, the sha256 of its keys, class coverage."""
    lab = np.asarray(labels).astype(bool)
    return {"label_fraction": fraction, "seed": seed, "size": int(len(idx)), "of": int(len(keys)),
            "keys_sha256": keys_digest([keys[i] for i in idx]),
            "classes_present": int((lab.sum(0) > 0).sum()), "classes_in_subset": int((lab[idx].sum(0) > 0).sum())}


@dataclass(frozen=True)
class TrainSubset:
    """The chosen training samples, in key order, and where they are in the shards."""

    keys: list[str]
    labels: np.ndarray
    """(n, C) uint8, rows as ``keys``."""
    positions: list[tuple[str, int]]
    """(shard name, byte offset) of each sample, rows as ``keys``."""
    description: dict[str, Any]
    """`describe_subset`: what results.json records."""

    @property
    def selection(self) -> Selection:
        return Selection.of(self.positions)

    @property
    def digest(self) -> str:
        """sha256 of the keys: what the training split's feature cache is keyed by."""
        return self.description["keys_sha256"]

    def __len__(self) -> int:
        return len(self.keys)


def choose_subset(keys: list[str], labels: np.ndarray, positions: list[tuple[str, int]], fraction: float,
                  seed: int) -> TrainSubset:
    """The subset of a training split given by its keys (sorted), labels (N, C) and positions, rows aligned."""
    idx = select_subset(labels, fraction, seed)
    return TrainSubset([keys[i] for i in idx], np.asarray(labels)[idx], [tuple(positions[i]) for i in idx],
                       describe_subset(labels, idx, keys, fraction, seed))
