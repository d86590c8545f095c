"""The three labelled splits: manifests loaded once, one-pass loaders, normalisation, gathering, caches.

- `EvalData`: the train / val / test manifests (loaded once, `pipeline.manifest`), a
  `PassLoader` per split (one pass in manifest order), the training stream of fine-tuning
  (`ShardLoader`), and `DeviceAugment` with the *training split's* statistics for every split.
- `EvalData.run`: one pass of this rank's part of a split, a function of each batch, the
  outputs of every rank gathered and sorted by key (so independent of the world size).
  Without a function it is a metadata pass: keys, labels and (shard, byte offset) positions
  from the tar headers and json members only (`train_index`).
- `SplitCache`: split outputs in memory (`MemoryCache`, for the runs of a sweep in one
  process) and as ``<feature_cache_dir>/<prefix>-<hash>.pt`` files.

Labels are each sample's json ``label_vector`` (BigEarthNet's 19 classes, SEN12MS's 10, in the
manifest's ``source.label_classes`` order), or its ``label_index`` as a one-hot row for
``eval.task=singlelabel`` (`task.Task`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from launch.config import ConfigError, EvalConfig
from launch.data.augment import DeviceAugment
from launch.data.loader import LoaderSettings, PassLoader, ShardLoader
from launch.data.reader import Selection
from launch.distributed import Runtime
from launch.evaluation.bands import BandMap, apply_maps
from launch.evaluation.subset import TrainSubset
from launch.evaluation.task import Task
from pipeline.index import read_index
from pipeline.manifest import Manifest, load_manifest
from pipeline.sources.bigearthnet import BIGEARTHNET_19_CLASSES
from pipeline.storage import put_atomic, read_bytes, redact_url, url_to_fs

log = logging.getLogger("launch.evaluation.data")

SPLITS = ("train", "val", "test")
CACHE_VERSION = 2
"""2: positions stored with the labels; training features keyed by the subset."""


@dataclass
class SplitOutput:
    """One row per sample of a split (or of a subset), sorted by key (independent of the number of processes)."""

    keys: list[str]
    labels: np.ndarray
    """(N, C) uint8."""
    values: np.ndarray
    """(N, K) float32: pooled features or class probabilities; K = 0 for a metadata pass."""
    positions: list[tuple[str, int]]
    """(shard name, byte offset) of each sample: where a `Selection` reads it."""


def load_manifests(cfg: EvalConfig) -> dict[str, Manifest]:
    d = cfg.data
    out = {}
    for split, url in (("train", d.train_manifest), ("val", d.val_manifest), ("test", d.test_manifest)):
        try:
            out[split] = load_manifest(url, d.storage_options)
        except (FileNotFoundError, ValueError) as err:  # ManifestError is a ValueError
            raise ConfigError(f"data.{split}_manifest: {err}") from err
        except PermissionError as err:  # refused credentials
            raise ConfigError(f"data.{split}_manifest={redact_url(url)}: access denied "
                              f"({redact_url(str(err))}); check the credentials") from err
    return out


class EvalData:
    """The three labelled splits: manifests, loaders, normalisation on the device, gathered passes."""

    def __init__(self, cfg: EvalConfig, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        self.manifests = load_manifests(cfg)
        self.settings = LoaderSettings.from_config(cfg.data)
        # Every split is normalised with the training split's statistics.
        self.augment = DeviceAugment.for_manifest(self.manifests["train"], cfg.data.image_size).to(rt.device)
        self._loaders: dict[tuple[str, Optional[str]], PassLoader] = {}
        self.task = Task(cfg.eval.task)
        self.bands: dict[str, BandMap] = {}
        """Set from the loaded encoder (`Pretrained.bands`); empty: the bands as they are."""

    # -- loaders --------------------------------------------------------------------------------
    def settings_for(self, samples: int, what: str) -> LoaderSettings:
        """The loader settings for ``samples`` samples over every rank: fewer workers when some stream
        would have none (a small label fraction), rather than failing."""
        W, K = self.rt.world_size, self.settings.num_workers
        if K <= 1 or samples >= W * K:
            return self.settings
        fewer = max(1, samples // W)
        if self.rt.is_main:
            log.warning("%s: %d samples for %d process(es) x %d workers; reading with %d worker(s) per process",
                        what, samples, W, K, fewer)
        return dataclasses.replace(self.settings, num_workers=fewer)

    def pass_loader(self, split: str, selection: Optional[Selection] = None, images: bool = True) -> PassLoader:
        """One pass over ``split`` (or its ``selection``). Image passes are kept (their workers persist
        between the validation passes of fine-tuning); a metadata pass is made once and dropped."""
        key = (split, None if selection is None else selection.digest()) if images else None
        if key is not None and key in self._loaders:
            return self._loaders[key]
        m = self.manifests[split]
        n = m.num_samples if selection is None else selection.num_samples
        loader = PassLoader(m, self.settings_for(n, f"{split} pass"), batch_size=self.cfg.eval.eval_batch_size,
                            rank=self.rt.rank, world_size=self.rt.world_size, with_meta=True, images=images,
                            selection=selection)
        if key is not None:
            self._loaders[key] = loader
        return loader

    def train_stream(self, subset: TrainSubset, batch_size: int, seed: int) -> ShardLoader:
        """The infinite, shuffled fine-tuning stream of the subset's samples only (crop boxes and flips drawn)."""
        W = self.rt.world_size
        if len(subset) < W:
            raise ConfigError(f"eval.label_fraction={self.cfg.eval.label_fraction} selects {len(subset)} training "
                              f"sample(s), fewer than the {W} processes; every process needs at least one: raise "
                              "the fraction or run fewer processes")
        return ShardLoader(self.manifests["train"], self.settings_for(len(subset), "training subset"),
                           micro_batch_size=batch_size, rank=self.rt.rank, world_size=W, seed=seed,
                           selection=subset.selection)

    def images(self, batch: dict[str, Any], augment: bool = False) -> tuple[Tensor, Tensor]:
        """Raw batch -> normalised S1, S2 (B, C, S, S) float32 on the device in the encoder's bands; resize only
        unless augment."""
        if not augment:
            batch = {k: v for k, v in batch.items() if k not in ("crop", "flip")}
        s1, s2, _ = self.augment(batch, self.rt.device)
        return apply_maps(self.bands, s1, s2)  # the downstream bands onto the encoder's, by name

    def class_names(self, num_classes: int) -> list[str]:
        """The label names of the test shards (``source.label_classes``), else BigEarthNet's 19."""
        names = self.manifests["test"].label_classes or list(BIGEARTHNET_19_CLASSES)
        return names if len(names) == num_classes else [f"class_{i}" for i in range(num_classes)]

    # -- passes ---------------------------------------------------------------------------------
    def run(self, split: str, fn: Optional[Callable[[Tensor, Tensor], Tensor]], desc: str,
            everywhere: bool = True, selection: Optional[Selection] = None) -> Optional[SplitOutput]:
        """One pass over ``split`` (this rank's part, of ``selection`` only if given), ``fn(s1, s2) -> (B, K)``
        per batch, gathered and sorted on every rank (everywhere) or on rank 0 only (None elsewhere).
        fn=None is a metadata pass: keys, labels and positions, no image bytes read."""
        keys: list[str] = []
        labels: list[list[int]] = []
        positions: list[tuple[str, int]] = []
        outs: list[np.ndarray] = []
        loader = self.pass_loader(split, selection, images=fn is not None)
        for batch in tqdm(loader, total=len(loader), desc=desc, disable=not self.rt.is_main, leave=False,
                          dynamic_ncols=True):
            keys.extend(batch["keys"])
            positions.extend((str(s), int(o)) for s, o in batch["positions"])
            labels.extend(self.task.label(m, k) for m, k in zip(batch["meta"], batch["keys"]))
            if fn is not None:
                s1, s2 = self.images(batch)
                with torch.no_grad():
                    outs.append(fn(s1, s2).float().cpu().numpy())
        values = np.concatenate(outs) if outs else np.zeros((len(keys), 0), np.float32)
        label_rows = np.asarray(labels, dtype=np.uint8).reshape(len(keys), -1)
        parts = self.rt.gather((keys, label_rows, values, positions), everywhere)
        return None if parts is None else self._sorted(split, parts)

    def _sorted(self, split: str, parts: list[tuple]) -> SplitOutput:
        """Every rank's part of a pass, merged in key order."""
        parts = [p for p in parts if len(p[0])]
        all_keys = [k for p in parts for k in p[0]]
        if not all_keys:
            raise ConfigError(f"the {split} split {self.manifests[split].shown}: no sample could be read")
        if len(set(all_keys)) != len(all_keys):
            raise RuntimeError(f"{split}: duplicate sample keys in the shards")
        order = np.argsort(np.asarray(all_keys, dtype=object), kind="stable")
        lab = np.concatenate([p[1] for p in parts])
        val = np.concatenate([p[2] for p in parts])
        pos = [q for p in parts for q in p[3]]
        return SplitOutput([all_keys[i] for i in order], lab[order], val[order].astype(np.float32),
                           [pos[i] for i in order])

    def train_index(self, cache: "SplitCache") -> SplitOutput:
        """Keys, labels and positions of every training sample, on every rank: from the shard set's sample index
        (`pipeline.index`: one small file, no shard bytes read) when it has one with labels, else from a
        metadata pass over the shards (tar headers and json members; cached)."""
        m = self.manifests["train"]
        # The index holds label vectors: multi-label only (single-label reads label_index from the json members).
        index = self.rt.on_main(lambda: read_index(m, self.cfg.data.storage_options)) \
            if self.task.name == "multilabel" else None
        if index is not None and index.labels is not None:
            if self.rt.is_main:
                print(f"training label index: {m.shown} has a sample index ({len(index.keys)} samples)", flush=True)
            return self._sorted("train", [(index.keys, index.labels, np.zeros((len(index.keys), 0), np.float32),
                                           index.positions)])
        key = cache.key(kind="labels", version=CACHE_VERSION, manifest=m.fingerprint, task=self.task.name)
        out = cache.get_or_make("labels", key, lambda: self.run("train", None, "labels train"),
                                "training label index", note="reused from")
        assert out is not None  # everywhere=True
        return out


# ============================================================================ caches


class MemoryCache:
    """The last few extracted splits of this process, so that repeated `evaluate` calls of a sweep reuse them."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._items: "OrderedDict[str, SplitOutput]" = OrderedDict()

    def get(self, key: str) -> Optional[SplitOutput]:
        if key in self._items:
            self._items.move_to_end(key)
        return self._items.get(key)

    def put(self, key: str, value: SplitOutput) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)


PROCESS_CACHE = MemoryCache()


class SplitCache:
    """Split outputs in memory and, with ``eval.cache_features``, as ``<dir>/<prefix>-<hash>.pt`` files."""

    def __init__(self, cfg: EvalConfig, rt: Runtime, memory: MemoryCache):
        self.enabled = cfg.eval.cache_features
        self.dir = cfg.feature_cache_dir
        self.storage_options = cfg.eval.storage_options
        self.rt, self.memory = rt, memory

    @staticmethod
    def key(**parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def path(self, prefix: str, key: str) -> str:
        return f"{self.dir.rstrip('/')}/{prefix}-{key}.pt"

    def get_or_make(self, prefix: str, key: str, make: Callable[[], Optional[SplitOutput]], what: str,
                    everywhere: bool = True, note: str = "cached in") -> Optional[SplitOutput]:
        """The cached output under ``key``, else ``make()`` (run by every rank: it may be collective).
        everywhere=False: only rank 0 needs the result (the others get None). A file hit prints
        ``<what>: <note> <url>``."""
        hit = self.memory.get(key) if self.rt.is_main else None
        if self.rt.broadcast(hit is not None):
            return self.rt.broadcast(hit) if everywhere else hit
        url = self.path(prefix, key)
        out = self._read(url) if (self.enabled and self.rt.is_main) else None
        if self.rt.broadcast(out is not None):
            if self.rt.is_main:
                print(f"{what}: {note} {redact_url(url)}", flush=True)
            out = self.rt.broadcast(out) if everywhere else out
        else:
            out = make()
            if self.enabled and self.rt.is_main:
                self._write(url, out)
        if self.rt.is_main:
            self.memory.put(key, out)
        return out

    def _read(self, url: str) -> Optional[SplitOutput]:
        fs, path = url_to_fs(url, self.storage_options)
        try:
            data = torch.load(io.BytesIO(read_bytes(fs, path)), map_location="cpu", weights_only=True)
            return SplitOutput(list(data["keys"]), data["labels"].numpy(), data["values"].numpy(),
                               [(str(s), int(o)) for s, o in data["positions"]])
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 - a damaged (or older) cache is recomputed, not fatal
            log.warning("ignoring unreadable cache %s: %s", redact_url(url), err)
            return None

    def _write(self, url: str, out: SplitOutput) -> None:
        fs, path = url_to_fs(url, self.storage_options)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "cache.pt")
            torch.save({"version": CACHE_VERSION, "keys": out.keys, "labels": torch.from_numpy(out.labels),
                        "values": torch.from_numpy(out.values), "positions": [list(p) for p in out.positions]},
                       local)
            put_atomic(fs, local, path)
