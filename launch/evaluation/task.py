"""What the head predicts: several labels per sample (BigEarthNet, SEN12MS multi-label) or one (SEN12MS
single-label). The two differ in the labels read, the loss, the probabilities and the metrics.

- ``multilabel``: each sample's json ``label_vector`` (0/1 per class); sigmoid, binary cross-entropy;
  `metrics.multilabel_metrics`; the best epoch by validation macro mAP.
- ``singlelabel``: ``label_index`` (SEN12MS: the majority simplified-IGBP class of the patch), kept as a
  one-hot row of the length of ``label_vector``; softmax, cross-entropy; `metrics.singlelabel_metrics`
  (accuracy, macro F1, and the AP numbers of the softmax scores); the best epoch by validation accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from launch.config import ConfigError
from launch.config.evaluation import TASKS  # noqa: F401 - the one list, in the schema
from launch.evaluation.metrics import multilabel_metrics, singlelabel_metrics



@dataclass(frozen=True)
class Task:
    name: str = "multilabel"

    @property
    def select(self) -> str:
        """The validation metric that picks the best epoch."""
        return "map_macro" if self.name == "multilabel" else "accuracy"

    def label(self, meta: Optional[dict[str, Any]], key: str) -> list[int]:
        vec = (meta or {}).get("label_vector")
        if vec is None:
            raise ConfigError(f"sample {key} has no `label_vector` in its json: evaluation needs labelled shards "
                              "(BigEarthNet or SEN12MS preprocessed by pipeline.preprocess)")
        if self.name == "multilabel":
            return [int(v) for v in vec]
        index = (meta or {}).get("label_index")
        if index is None or not 0 <= int(index) < len(vec):
            raise ConfigError(f"sample {key} has no valid `label_index` in its json: eval.task=singlelabel needs "
                              "one class per sample (SEN12MS shards); use eval.task=multilabel for these shards")
        row = [0] * len(vec)
        row[int(index)] = 1
        return row

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.name == "multilabel":
            return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
        return F.cross_entropy(logits.float(), targets.argmax(1))

    def probs(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits.float()) if self.name == "multilabel" else torch.softmax(logits.float(), dim=1)

    def metrics(self, y_true: np.ndarray, probs: np.ndarray, names: Optional[list[str]] = None) -> dict[str, Any]:
        if self.name == "multilabel":
            return multilabel_metrics(y_true, probs, names)
        return singlelabel_metrics(y_true, probs, names)

    def score(self, metrics: dict[str, Any]) -> float:
        """The selection metric of validation ``metrics``; -1 when undefined (no class present)."""
        value = metrics.get(self.select)
        return -1.0 if value is None else float(value)
