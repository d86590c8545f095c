"""Optimizers and learning-rate schedules of the evaluation protocols.

The peak rate follows the linear scaling rule when ``eval.lr_reference_batch`` is set; the
schedule is pretraining's `warmup_cosine` (`launch.training.schedule`), stepped once per
optimizer step; fine-tuning adds layer-wise learning-rate decay (`layer_decay_groups`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from launch.config import EvalConfig
from launch.training.schedule import warmup_cosine


def peak_lr(cfg: EvalConfig, global_batch: int) -> float:
    e = cfg.eval
    return e.lr * global_batch / e.lr_reference_batch if e.lr_reference_batch else e.lr


def make_optimizer(cfg: EvalConfig, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    e = cfg.eval
    if e.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=e.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(e.betas))


def make_schedule(cfg: EvalConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                  lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``eval.warmup_epochs``, cosine decay to ``eval.min_lr`` at the last step."""
    e = cfg.eval
    floor = min(1.0, e.min_lr / lr) if lr > 0 else 0.0
    factor = warmup_cosine(int(round(e.warmup_epochs * steps_per_epoch)), e.epochs * steps_per_epoch, floor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float,
                       encoder_lr_scale: float) -> list[dict[str, Any]]:
    """Parameter groups with layer-wise learning-rate decay (BEiT, MAE fine-tuning) of a `Classifier`.

    With n encoder blocks, layer 0 is everything before the blocks (patch embeddings, modality
    embeddings, CLS token), block i is layer i + 1, the final norm and the head are layer n + 1.
    A layer's rate is lr x layer_decay^(n + 1 - layer), times encoder_lr_scale for the encoder.
    No weight decay on biases, norms and learned tokens (``FusMAE.no_weight_decay``). Each group
    also lists its parameters' ``names`` (drop them before handing the groups to an optimizer).
    """
    n = len(model.encoder.blocks)
    skip = {f"encoder.{k}" for k in model.encoder.no_weight_decay()} | {"head.bias"}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("head."):
            layer, scale = n + 1, 1.0
        else:
            sub = name[len("encoder."):]
            layer = int(sub.split(".")[1]) + 1 if sub.startswith("blocks.") else (n + 1 if sub.startswith("norm") else 0)
            scale = layer_decay ** (n + 1 - layer) * encoder_lr_scale
        no_decay = name in skip
        g = groups.setdefault((layer if name.startswith("encoder.") else -1, no_decay), {
            "params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr": lr * scale,
            "lr_scale": scale, "layer": layer})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]
