"""Multi-label and single-label metrics of the test split (and of the validation split, for model selection).

`average_precision` is scikit-learn's definition (no interpolation); `multilabel_metrics` gives
macro / micro mAP, micro / macro F1 at a threshold and the per-class values; `format_table`
prints them. The tests check every number against scikit-learn.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """Average precision of one binary problem as scikit-learn defines it: sum over the distinct
    score thresholds, highest first, of (R_k - R_(k-1)) P_k (no interpolation). None without positives."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    positives = int(y.sum())
    if positives == 0:
        return None
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of equal scores
    tps = np.cumsum(y)[last]
    precision = tps / (last + 1)
    recall = tps / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_metrics(y_true: np.ndarray, probs: np.ndarray, names: Optional[list[str]] = None,
                       threshold: float = 0.5) -> dict[str, Any]:
    """Multi-label metrics of probabilities ``probs`` (N, C) against 0/1 ``y_true`` (N, C).

    - map_macro: mean of the per-class AP over the classes with a positive in ``y_true``;
    - map_micro: AP of all (sample, class) pairs together (scikit-learn's ``average="micro"``);
    - f1 (micro) over all pairs, f1_macro the mean per-class F1 over the present classes,
      predictions ``probs >= threshold``;
    - per_class_ap / per_class_f1: name -> value, None for a class absent from ``y_true``.
    """
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(probs, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2:
        raise ValueError(f"y_true {y.shape} and probs {p.shape} must be the same (N, C) shape")
    names = names or [f"class_{i}" for i in range(y.shape[1])]
    pred = p >= threshold
    aps = [average_precision(y[:, c], p[:, c]) for c in range(y.shape[1])]
    tp = (pred & y).sum(0)
    fp = (pred & ~y).sum(0)
    fn = (~pred & y).sum(0)
    present = y.sum(0) > 0
    f1s = [float(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c])) if present[c] else None for c in range(y.shape[1])]
    denom = 2 * tp.sum() + fp.sum() + fn.sum()
    valid_ap = [a for a in aps if a is not None]
    valid_f1 = [f for f in f1s if f is not None]
    return {
        "map_macro": float(np.mean(valid_ap)) if valid_ap else None,
        "map_micro": average_precision(y.ravel(), p.ravel()),
        "f1": float(2 * tp.sum() / denom) if denom else 0.0,
        "f1_macro": float(np.mean(valid_f1)) if valid_f1 else None,
        "per_class_ap": dict(zip(names, aps)),
        "per_class_f1": dict(zip(names, f1s)),
        "num_samples": int(y.shape[0]),
        "classes_present": int(present.sum()),
    }


def singlelabel_metrics(y_true: np.ndarray, probs: np.ndarray, names: Optional[list[str]] = None) -> dict[str, Any]:
    """Single-label metrics of class probabilities ``probs`` (N, C) against one-hot ``y_true`` (N, C).

    - accuracy: top-1, the predicted class ``argmax(probs)``;
    - f1_macro: the mean per-class F1 over the classes that are true or predicted for some sample
      (scikit-learn's ``f1_score(average="macro")``); per_class_f1 None for the others;
    - f1: micro F1, which for one label per sample equals the accuracy;
    - map_macro, map_micro, per_class_ap: as `multilabel_metrics`, of the probabilities.
    """
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(probs, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2:
        raise ValueError(f"y_true {y.shape} and probs {p.shape} must be the same (N, C) shape")
    if not (y.sum(1) == 1).all():
        raise ValueError("single-label metrics need exactly one true class per sample")
    out = multilabel_metrics(y, p, names)
    names = list(out["per_class_ap"])
    true, pred = y.argmax(1), p.argmax(1)
    f1s: list[Optional[float]] = []
    for c in range(y.shape[1]):
        tp, fp, fn = int(((pred == c) & (true == c)).sum()), int(((pred == c) & (true != c)).sum()), \
            int(((pred != c) & (true == c)).sum())
        f1s.append(float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else None)
    valid = [f for f in f1s if f is not None]
    accuracy = float((true == pred).mean())
    out.update(accuracy=accuracy, f1=accuracy, f1_macro=float(np.mean(valid)) if valid else None,
               per_class_f1=dict(zip(names, f1s)))
    return out


def format_table(metrics: dict[str, Any], title: str = "") -> str:
    """The per-class AP and the headline numbers as a text table."""
    width = min(max([len(n) for n in metrics["per_class_ap"]] + [10]), 60)
    lines = [title] if title else []
    lines.append(f"{'class':<{width}}  {'AP':>6}  {'F1':>6}")
    lines.append("-" * (width + 16))
    for name, ap in metrics["per_class_ap"].items():
        f1 = metrics.get("per_class_f1", {}).get(name)
        show = name if len(name) <= width else name[: width - 1] + "…"
        lines.append(f"{show:<{width}}  {_cell(ap)}  {_cell(f1)}")
    lines.append("-" * (width + 16))
    if "accuracy" in metrics:
        lines.append(f"accuracy {_num(metrics['accuracy'])}")
    lines.append(f"mAP macro {_num(metrics['map_macro'])}   mAP micro {_num(metrics['map_micro'])}   "
                 f"F1 micro {_num(metrics['f1'])}   F1 macro {_num(metrics['f1_macro'])}   "
                 f"({metrics['num_samples']} samples, {metrics['classes_present']} classes present)")
    return "\n".join(lines)


def _cell(v: Optional[float]) -> str:
    return "  -   " if v is None else f"{v:6.3f}"


def _num(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.4f}"
