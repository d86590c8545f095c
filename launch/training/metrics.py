"""Training metrics: accumulated on the device, read back only at log intervals.

Each logged step appends one JSON line to ``<run.dir>/metrics.jsonl`` with at
least step, loss, loss_s1, loss_s2, lr, samples_per_s (and, where it applies,
mfu, nonfinite_pixels, skipped_shards, eta_s), prints a line on rank 0 and
forwards the scalars to DeepSpeed's monitor (CSV / TensorBoard) when enabled.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

# Dense bf16 peak of the accelerators people train on, in FLOP/s (vendor datasheets).
PEAK_BF16_FLOPS = {  # matched in order against the device name: specific names first
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def peak_flops(device_name: Optional[str]) -> Optional[float]:
    if not device_name:
        return None
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


class NonFiniteLoss(RuntimeError):
    pass


class MetricsLogger:
    """Sums losses on the device between log steps; one all-reduce and one host read per log step."""

    def __init__(self, run_dir: str, rank: int, world_size: int, max_steps: int, samples_per_step: int,
                 flops_per_sample: Optional[float], device_name: Optional[str], monitor=None,
                 resume_step: int = 0):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.rank, self.world_size = rank, world_size
        self.max_steps = max_steps
        self.samples_per_step = samples_per_step
        self.flops_per_sample = flops_per_sample
        self.peak = peak_flops(device_name)
        self.monitor = monitor
        self._sums: Optional[torch.Tensor] = None  # (loss, loss_s1, loss_s2, nonfinite, count)
        self._t0 = time.time()
        self._step0 = resume_step
        if rank == 0:
            os.makedirs(run_dir, exist_ok=True)
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: drop lines the interrupted run logged."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(lines)

    def accumulate(self, loss: torch.Tensor, loss_s1: Optional[torch.Tensor], loss_s2: Optional[torch.Tensor],
                   nonfinite: torch.Tensor) -> None:
        zero = loss.new_zeros(())
        vals = torch.stack([
            loss.detach().float(),
            (loss_s1.detach().float() if loss_s1 is not None else zero),
            (loss_s2.detach().float() if loss_s2 is not None else zero),
            nonfinite.detach().float().to(loss.device),
            loss.new_ones(()).float(),
        ])
        self._sums = vals if self._sums is None else self._sums + vals

    def log(self, step: int, lr: float, extra: Optional[dict[str, Any]] = None,
            summed: Optional[dict[str, float]] = None) -> dict[str, Any]:
        """Reduce across ranks, check finiteness, write the line. Collective: call on every rank.

        ``extra``: values of rank 0 written as they are; ``summed``: this rank's counts (e.g. skipped shards),
        written as their sum over every rank (reduced with the losses, one collective)."""
        assert self._sums is not None, "log() before any accumulate()"
        names = sorted(summed or {})
        counts = torch.tensor([float((summed or {})[k]) for k in names], device=self._sums.device)
        sums = torch.cat([self._sums, counts])
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(sums)
        values = sums.tolist()
        loss, l1, l2, nonfinite, count = values[:5]
        totals = {k: int(v) for k, v in zip(names, values[5:])}
        self._sums = None
        now = time.time()
        steps_done = step - self._step0
        rate = steps_done * self.samples_per_step / max(now - self._t0, 1e-9)
        self._t0, self._step0 = now, step
        mean = loss / count
        if not math.isfinite(mean):
            raise NonFiniteLoss(
                f"non-finite loss ({mean}) at step {step}: stopping. Lower train.base_lr (or train.lr), check "
                "the data statistics in the manifest, or keep train.bf16 with gradient clipping on."
            )
        row: dict[str, Any] = {
            "step": step,
            "loss": mean,
            "loss_s1": l1 / count,
            "loss_s2": l2 / count,
            "lr": lr,
            "samples_per_s": rate,
            "nonfinite_pixels": int(nonfinite),
            "eta_s": (self.max_steps - step) * self.samples_per_step / max(rate, 1e-9),
        }
        if self.flops_per_sample and self.peak:
            row["mfu"] = rate * self.flops_per_sample / (self.peak * self.world_size)
        row.update(extra or {})
        row.update(totals)
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            mfu = f" mfu {row['mfu']:.1%}" if "mfu" in row else ""
            print(f"step {step}/{self.max_steps} loss {mean:.4f} (s1 {row['loss_s1']:.4f} s2 {row['loss_s2']:.4f}) "
                  f"lr {lr:.2e} {rate:.1f} samples/s{mfu} eta {row['eta_s'] / 60:.1f} min", flush=True)
            if self.monitor is not None and getattr(self.monitor, "enabled", False):
                self.monitor.write_events([(f"train/{k}", float(v), step) for k, v in row.items()
                                           if k != "step" and isinstance(v, (int, float))])
        return row
