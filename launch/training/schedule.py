"""Learning-rate schedules and optimizer groups shared by pretraining and fine-tuning."""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float) -> Callable[[int], float]:
    """Factor of the peak learning rate at each step (a `LambdaLR` function): linear warm-up over
    ``warmup_steps``, then cosine decay to ``floor`` (a fraction of the peak) at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def decay_groups(model: nn.Module, weight_decay: float, skip: set[str]) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on every trainable parameter except those named in ``skip``
    (tokens, norms and biases in MAE's recipe: ``FusMAE.no_weight_decay()``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
