"""The classification head both protocols train.

A linear layer on the encoder's pooled features (``FusMAE.encode``: (B, D)) giving (B, C)
logits, initialised as MAE's linear probe (weights N(0, 0.01), bias 0). The loss is the
task's (`task.Task.loss`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from model import FusMAE

HEAD_INIT_STD = 0.01


def linear_head(in_dim: int, num_classes: int, generator: Optional[torch.Generator] = None) -> nn.Linear:
    """(B, in_dim) features -> (B, num_classes) logits; seeded by ``generator``."""
    head = nn.Linear(in_dim, num_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, HEAD_INIT_STD, generator=generator)
        head.bias.zero_()
    return head


class Classifier(nn.Module):
    """The encoder's pooled features (``encode``) and a linear multi-label head: (B, num_classes) logits."""

    def __init__(self, encoder: FusMAE, num_classes: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.encoder = encoder
        self.head = linear_head(encoder.cfg.embed_dim, num_classes, generator)

    def forward(self, s1: Optional[Tensor], s2: Optional[Tensor]) -> Tensor:
        c = self.encoder.cfg
        feats = self.encoder.encode(s1 if c.uses_s1 else None, s2 if c.uses_s2 else None)  # (B, D)
        return self.head(feats)
