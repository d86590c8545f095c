"""Linear probing: a frozen encoder, pooled features extracted once per split, a linear head on them.

Only the training *subset*'s samples are read for the training features (a `Selection`
of the metadata pass's positions); validation and test are read whole. Features are
cached (`SplitCache`) by the weights, the input settings and, for the training split,
the subset; a sweep over seeds and fractions sharing ``eval.feature_cache_dir`` reads
val and test once. Features are standardised with the subset's per-dimension mean and
std (the role of MAE's BatchNorm without affine parameters before its linear probe).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from launch.config import EvalConfig
from launch.distributed import Runtime
from launch.evaluation.data import CACHE_VERSION, SPLITS, EvalData, SplitCache, SplitOutput
from launch.evaluation.head import linear_head
from launch.evaluation.task import Task
from launch.evaluation.optim import make_optimizer, make_schedule, peak_lr
from launch.evaluation.pretrained import RUNTIME_FIELDS, Pretrained
from launch.evaluation.subset import TrainSubset, choose_subset

log = logging.getLogger("launch.evaluation.linear_probe")


class LinearProbe:
    """Frozen encoder, cached pooled features, a linear head trained on the training subset (rank 0)."""

    def __init__(self, cfg: EvalConfig, rt: Runtime, data: EvalData, pretrained: Pretrained, cache: SplitCache):
        self.cfg, self.rt, self.data, self.pretrained, self.cache = cfg, rt, data, pretrained, cache
        self.encoder = pretrained.net.to(rt.device).eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.autocast_enabled = cfg.eval.bf16 and rt.device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast_enabled)

    def features(self, split: str, subset: Optional[TrainSubset] = None) -> Optional[SplitOutput]:
        """Pooled features of ``split`` (of the ``subset``'s samples only, if given) on rank 0; None elsewhere."""
        m = self.data.manifests[split]
        net_cfg = {k: v for k, v in self.pretrained.cfg.to_dict().items() if k not in RUNTIME_FIELDS}
        key = self.cache.key(kind="features", version=CACHE_VERSION, weights=self.pretrained.digest, task=self.data.task.name,
                             model=net_cfg, manifest=m.fingerprint, image_size=self.cfg.data.image_size,
                             stats=self.data.manifests["train"].stats, bf16=self.autocast_enabled,
                             subset=None if subset is None else subset.digest)
        selection = None if subset is None else subset.selection
        return self.cache.get_or_make(
            "features", key,
            lambda: self.data.run(split, self.encode, f"features {split}", everywhere=False, selection=selection),
            f"features of {split}", everywhere=False)

    def encode(self, s1: Tensor, s2: Tensor) -> Tensor:
        c = self.pretrained.cfg
        with self.autocast:
            return self.encoder.encode(s1 if c.uses_s1 else None, s2 if c.uses_s2 else None)  # (B, D)

    def run(self) -> Optional[dict[str, Any]]:
        """The probe's results on rank 0 (None elsewhere): test metrics of the best epoch by val mAP."""
        e = self.cfg.eval
        index = self.data.train_index(self.cache)
        subset = choose_subset(index.keys, index.labels, index.positions, e.label_fraction, e.seed)
        feats = {"train": self.features("train", subset), "val": self.features("val"),
                 "test": self.features("test")}
        if not self.rt.is_main:
            return None
        train = feats["train"]
        if train.keys != subset.keys:
            log.warning("features of %d of the %d training subset samples could be read", len(train.keys),
                        len(subset))
        x = torch.from_numpy(train.values)
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
        X = {s: (torch.from_numpy(feats[s].values) - mean) / std for s in SPLITS}
        Y = {s: torch.from_numpy(feats[s].labels).float() for s in SPLITS}
        return {**self.train_head(X, Y, feats), "subset": subset.description}

    def train_head(self, X: dict[str, Tensor], Y: dict[str, Tensor],
                   feats: dict[str, SplitOutput]) -> dict[str, Any]:
        """Train the head on X/Y["train"] (standardised features (N, D), labels (N, C)); the epoch with the
        best validation macro mAP gives the test metrics."""
        cfg, e = self.cfg, self.cfg.eval
        g = torch.Generator().manual_seed(e.seed)
        D, C = X["train"].shape[1], Y["train"].shape[1]
        head = linear_head(D, C, g)
        n = len(X["train"])
        bs = min(e.batch_size, n)
        steps = math.ceil(n / bs)
        lr = peak_lr(cfg, bs)
        groups = [{"params": [head.weight], "weight_decay": e.weight_decay},
                  {"params": [head.bias], "weight_decay": 0.0}]
        opt = make_optimizer(cfg, groups, lr)
        sched = make_schedule(cfg, opt, steps, lr)
        names = self.data.class_names(C)
        task = self.data.task

        best = (-1.0, 0, copy.deepcopy(head.state_dict()))
        history = []
        bar = tqdm(range(e.epochs), desc="linear probe", dynamic_ncols=True)
        for epoch in bar:
            train_loss = self._epoch(head, opt, sched, X["train"], Y["train"], bs, g, task)
            if not math.isfinite(train_loss):
                raise RuntimeError(f"linear probe: non-finite training loss at epoch {epoch + 1}")
            with torch.no_grad():
                val = task.metrics(feats["val"].labels, task.probs(head(X["val"])).numpy(), names)
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_map_macro": val["map_macro"],
                            **({"val_accuracy": val["accuracy"]} if "accuracy" in val else {})})
            score = task.score(val)
            if score > best[0]:
                best = (score, epoch + 1, copy.deepcopy(head.state_dict()))
            bar.set_postfix(loss=f"{train_loss:.4f}", val_map=f"{score:.4f}", best=best[1], refresh=False)
        head.load_state_dict(best[2])
        with torch.no_grad():
            probs = task.probs(head(X["test"])).numpy()
        test = task.metrics(feats["test"].labels, probs, names)
        return {"test": test, "best_epoch": best[1], "val_map_macro": history[best[1] - 1]["val_map_macro"],
                "val_score": best[0], "selected_by": task.select, "history": history,
                "lr": lr, "batch_size": bs}

    @staticmethod
    def _epoch(head: nn.Linear, opt: torch.optim.Optimizer, sched: Any, x: Tensor, y: Tensor, bs: int,
               g: torch.Generator, task: Task) -> float:
        """One shuffled pass over (x, y) in batches of ``bs``; the mean loss (one host read)."""
        n = len(x)
        steps = math.ceil(n / bs)
        perm = torch.randperm(n, generator=g)
        total = torch.zeros(())
        for b in range(steps):
            sel = perm[b * bs:(b + 1) * bs]
            loss = task.loss(head(x[sel]), y[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
        return float(total) / steps
