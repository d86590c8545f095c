"""Fine-tuning: encoder + linear head trained end to end (DDP over every process), best epoch by the task's
validation metric (macro mAP, or accuracy for single-label).

The training stream is a `ShardLoader` over the label subset's samples only (a `Selection`
of the metadata pass's positions): the pretraining augmentation (random resized crop +
flips) on the device, layer-wise learning-rate decay (`layer_decay_groups`), the schedule
stepped per optimizer step.

Checkpoints go through the one commit protocol of `launch.training.checkpoint`::

    epoch-00003/state.pt            rank 0: model, optimizer, schedule, best weights, history, the
                                    settings, the subset and the loader's position (``state_dict()``)
    epoch-00003/_ranks/rank<r>.json each rank's record, written when it reached the end of epoch 3
    latest                          {"tag": "epoch-00003", "epoch": 3, "world_size": W, ...}, by `commit`

``eval.resume=auto`` continues from `find_latest`; the loader's own state makes the resumed
run's batches those of an uninterrupted run (at the same world size and workers).
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from launch.config import ConfigError, EvalConfig
from launch.distributed import Runtime
from launch.evaluation.data import EvalData, SplitCache, SplitOutput
from launch.evaluation.head import Classifier
from launch.evaluation.optim import layer_decay_groups, make_optimizer, make_schedule, peak_lr
from launch.evaluation.pretrained import RUNTIME_FIELDS, Pretrained
from launch.evaluation.subset import choose_subset
from launch.training import checkpoint
from pipeline.storage import redact_url, url_to_fs

EPOCH_PREFIX = "epoch-"
STATE = "state.pt"

RESUME_IGNORED = {
    "eval": ("resume", "stop_at_epoch", "checkpoint_every", "checkpoint_dir", "cache_features", "feature_cache_dir",
             "storage_options", "eval_batch_size"),
    "data": ("num_workers", "cache_dir", "storage_options"),
    "run": ("dir",),
    "storage": ("retry_window_s",),
}


def resume_settings(cfg: EvalConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run that wrote the checkpoint (credentials redacted)."""
    d = cfg.to_dict(redacted=True)
    for section, keys in RESUME_IGNORED.items():
        for k in keys:
            d[section].pop(k, None)
    for k in RUNTIME_FIELDS:
        d["model"].pop(k, None)
    return d


def settings_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += settings_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


class FineTuneCheckpoints:
    """Fine-tuning state under one fsspec URL, written and found through `launch.training.checkpoint`."""

    def __init__(self, url: str, rt: Runtime, storage_options: Optional[dict[str, Any]] = None):
        self.url, self.shown = url.rstrip("/"), redact_url(url.rstrip("/"))
        self.storage_options = dict(storage_options or {})
        self.fs, root = url_to_fs(self.url, self.storage_options)
        self.root = root.rstrip("/")
        self.rt = rt
        self.run_id = rt.broadcast(checkpoint.new_run_id() if rt.is_main else None)

    def latest(self) -> Optional[checkpoint.Committed]:
        """The committed checkpoint (rank 0 looks, every rank gets it); None when there is none."""

        def find() -> Optional[checkpoint.Committed]:
            try:
                return checkpoint.find_latest(self.url, self.storage_options)
            except (RuntimeError, ValueError, KeyError) as err:
                raise ConfigError(f"{self.shown}: not a usable fine-tuning checkpoint folder "
                                  f"({type(err).__name__}: {err})") from err

        return self.rt.on_main(find, expected=(ConfigError,))

    def discard_uncommitted(self, found: Optional[checkpoint.Committed]) -> None:
        """Remove epoch folders an interrupted run left after its last commit: their rank records
        (perhaps of another world size) must not mix with the ones this run writes."""
        if self.rt.is_main:
            checkpoint.discard_uncommitted(self.url, self.storage_options, found.tag if found else None,
                                           prefix=EPOCH_PREFIX)
        self.rt.barrier()

    def save(self, epoch: int, state: Optional[dict[str, Any]]) -> None:
        """Rank 0 uploads ``state``; every rank writes its record; rank 0 commits (older epochs go)."""
        tag = f"{EPOCH_PREFIX}{epoch:05d}"
        files: list[dict[str, Any]] = []
        if self.rt.is_main:
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, STATE)
                torch.save(state, local)
                files = checkpoint.upload_files(self.fs, self.root, tag, [local])
        checkpoint.write_rank_record(self.fs, self.root, tag, self.rt.rank, self.rt.world_size, self.run_id, files,
                                     epoch=epoch)
        if self.rt.is_main:
            pointer = {"epoch": epoch, "world_size": self.rt.world_size}
            if not checkpoint.commit(self.fs, self.root, tag, self.run_id, pointer, keep=1):
                raise RuntimeError(f"fine-tuning checkpoint {self.shown}/{tag}: not every rank wrote its record")
        self.rt.barrier()

    def load(self, found: checkpoint.Committed) -> dict[str, Any]:
        """The state of a committed checkpoint (downloaded and checksummed by every rank)."""
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.fetch(found, tmp, self.storage_options)
            # Our own file, holding optimizer states and Python objects: not weights_only.
            return torch.load(os.path.join(tmp, found.tag, STATE), map_location="cpu", weights_only=False)


class FineTuner:
    """Encoder + linear head trained end to end (DDP over every process), best epoch by the task's validation metric."""

    def __init__(self, cfg: EvalConfig, rt: Runtime, data: EvalData, pretrained: Pretrained, cache: SplitCache):
        self.cfg, self.rt, self.data, self.pretrained = cfg, rt, data, pretrained
        e = cfg.eval

        # The subset, from the labels of the whole training split (sorted by key: the same for any world size).
        index = data.train_index(cache)
        self.subset = choose_subset(index.keys, index.labels, index.positions, e.label_fraction, e.seed)
        self.row_of = {k: i for i, k in enumerate(self.subset.keys)}
        num_classes = self.subset.labels.shape[1]
        self.names = data.class_names(num_classes)

        g = torch.Generator().manual_seed(e.seed)
        self.model = Classifier(pretrained.net, num_classes, generator=g).to(rt.device)
        self.model.train()
        self.ddp: nn.Module = self.model
        if rt.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

        self.global_batch = e.batch_size * rt.world_size
        self.steps_per_epoch = max(1, math.ceil(len(self.subset) / self.global_batch))
        self.lr = peak_lr(cfg, self.global_batch)
        groups = layer_decay_groups(self.model, self.lr, e.weight_decay, e.layer_decay, e.encoder_lr_scale)
        for gr in groups:
            gr.pop("names")
        self.optimizer = make_optimizer(cfg, groups, self.lr)
        self.scheduler = make_schedule(cfg, self.optimizer, self.steps_per_epoch, self.lr)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=e.bf16 and rt.device.type == "cuda")
        self.loader = data.train_stream(self.subset, e.batch_size, e.seed)

        self.epoch = 0
        self.best: dict[str, Any] = {"epoch": 0, "val_map_macro": -1.0, "val_score": -1.0, "weights": None}
        self.history: list[dict[str, Any]] = []
        self.store = FineTuneCheckpoints(cfg.checkpoint_dir, rt, e.storage_options) if e.checkpoint_every else None
        self._resume()

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "best": self.best, "history": self.history,
                "settings": resume_settings(self.cfg), "subset": self.subset.description,
                "loader": self.loader.state_dict()}

    def _resume(self) -> None:
        e = self.cfg.eval
        if self.store is None:
            if e.resume == "auto":
                raise ConfigError("eval.resume=auto needs checkpoints (eval.checkpoint_every > 0)")
            return
        found = self.store.latest()
        shown = self.store.shown
        if found is not None and e.resume == "none":
            raise ConfigError(f"{shown} already holds a fine-tuning checkpoint ({found.tag}): pass "
                              "eval.resume=auto to continue it, or set eval.checkpoint_dir / run.dir elsewhere")
        self.store.discard_uncommitted(found)
        if found is None:
            if e.resume == "auto" and self.rt.is_main:
                print(f"eval.resume=auto: no checkpoint in {shown}; starting fresh", flush=True)
            return
        state = self.store.load(found)
        changed = settings_diff(state["settings"], resume_settings(self.cfg))
        if changed:
            raise ConfigError(f"{shown}/{found.tag} was written with other settings; resume with the same "
                              f"ones or start elsewhere. Differences: {'; '.join(changed)}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.best, self.history = state["epoch"], state["best"], state["history"]
        self.loader.load_state_dict(state["loader"])  # another world size: same point of the stream, with a warning
        if self.rt.is_main:
            how = "" if found.world_size == self.rt.world_size else \
                f" (world size {found.world_size} -> {self.rt.world_size}: the data order differs)"
            print(f"resumed fine-tuning from {shown}/{found.tag} after epoch {self.epoch}{how}", flush=True)

    # ------------------------------------------------------------------- loop
    def train_step(self, batch: dict[str, Any]) -> Tensor:
        rows = [self.row_of[k] for k in batch["keys"]]
        y = torch.from_numpy(self.subset.labels[rows]).to(self.rt.device)
        s1, s2 = self.data.images(batch, augment=self.cfg.data.augment)
        with self.autocast:
            logits = self.ddp(s1, s2)
        loss = self.data.task.loss(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.eval.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.eval.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def predict(self, split: str) -> SplitOutput:
        """Class probabilities of every sample of ``split``, gathered on every rank."""
        self.model.eval()

        def probs(s1: Tensor, s2: Tensor) -> Tensor:
            with self.autocast:
                return self.data.task.probs(self.model(s1, s2))

        out = self.data.run(split, probs, f"predict {split}")
        self.model.train()
        return out

    def train_epoch(self, batches: Any) -> float:
        """``steps_per_epoch`` optimizer steps; the mean training loss (one host read per epoch)."""
        total = torch.zeros((), device=self.rt.device)
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {self.epoch + 1}/{self.cfg.eval.epochs}", leave=False,
                   disable=not self.rt.is_main, dynamic_ncols=True)
        for _ in bar:
            total += self.train_step(next(batches))
        train_loss = float(total) / self.steps_per_epoch
        if not math.isfinite(train_loss):
            raise RuntimeError(f"fine-tuning: non-finite training loss in epoch {self.epoch + 1}")
        return train_loss

    def validate(self, train_loss: float) -> None:
        """Score the epoch just trained on the validation split; keep its weights if it is the best."""
        e = self.cfg.eval
        val = self.predict("val")
        task = self.data.task
        metrics = task.metrics(val.labels, val.values, self.names)
        score, val_map = task.score(metrics), metrics["map_macro"]
        val_map = -1.0 if val_map is None else val_map
        self.history.append({"epoch": self.epoch, "train_loss": train_loss, "val_map_macro": val_map,
                             **({"val_accuracy": metrics["accuracy"]} if "accuracy" in metrics else {}),
                             "lr": max(self.scheduler.get_last_lr())})
        best = self.best.get("val_score", self.best["val_map_macro"])
        if score > best or self.best["weights"] is None:
            self.best = {"epoch": self.epoch, "val_map_macro": val_map, "val_score": score,
                         "weights": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}
        if self.rt.is_main:
            print(f"epoch {self.epoch}/{e.epochs}: train loss {train_loss:.4f}, val {task.select} {score:.4f} "
                  f"(best {self.best.get('val_score', -1.0):.4f} at epoch {self.best['epoch']})", flush=True)

    def train(self) -> Optional[dict[str, Any]]:
        """Train to ``eval.epochs`` (or ``stop_at_epoch``); the test results of the best epoch on rank 0,
        None elsewhere and for a stopped run."""
        e = self.cfg.eval
        stop = e.epochs if e.stop_at_epoch is None else min(e.stop_at_epoch, e.epochs)
        if self.epoch >= stop and self.rt.is_main:
            print(f"nothing to train: already after epoch {self.epoch}", flush=True)
        batches = iter(self.loader)
        while self.epoch < stop:
            train_loss = self.train_epoch(batches)
            self.epoch += 1
            self.validate(train_loss)
            if self.store is not None and (self.epoch % e.checkpoint_every == 0 or self.epoch == stop):
                self.store.save(self.epoch, self._state() if self.rt.is_main else None)
        if self.epoch < e.epochs:
            if self.rt.is_main:
                print(f"stopped after epoch {self.epoch} of {e.epochs} (eval.stop_at_epoch); continue with "
                      "eval.resume=auto", flush=True)
            return None
        self.model.load_state_dict(self.best["weights"])
        test = self.predict("test")
        if not self.rt.is_main:
            return None
        task = self.data.task
        return {"test": task.metrics(test.labels, test.values, self.names), "best_epoch": self.best["epoch"],
                "val_map_macro": self.best["val_map_macro"],
                "val_score": self.best.get("val_score", self.best["val_map_macro"]), "selected_by": task.select,
                "history": self.history,
                "subset": self.subset.description, "lr": self.lr, "batch_size": self.global_batch}
