"""Training metrics: what reaches metrics.jsonl, the non-finite stop, resumed runs."""

from __future__ import annotations

import json

import pytest
import torch

from launch.training.metrics import MetricsLogger, NonFiniteLoss, peak_flops


def _logger(tmp_path, **kw):
    return MetricsLogger(str(tmp_path), rank=0, world_size=1, max_steps=10, samples_per_step=8,
                         flops_per_sample=1e9, device_name=None, **kw)


def test_log_writes_the_mean_over_the_interval(tmp_path):
    m = _logger(tmp_path)
    for loss in (1.0, 3.0):
        m.accumulate(torch.tensor(loss), torch.tensor(loss / 2), torch.tensor(loss / 2), torch.tensor(2))
    row = m.log(2, lr=0.1)
    assert row["loss"] == pytest.approx(2.0) and row["loss_s1"] == pytest.approx(1.0)
    assert row["nonfinite_pixels"] == 4 and "mfu" not in row  # no GPU peak known: no MFU
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "loss_s1", "loss_s2", "lr", "samples_per_s"} <= set(line)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    m = _logger(tmp_path)
    m.accumulate(torch.tensor(1.0), None, None, torch.tensor(0))
    m.accumulate(torch.tensor(float("nan")), None, None, torch.tensor(0))
    with pytest.raises(NonFiniteLoss, match="non-finite loss .* at step 2"):
        m.log(2, lr=0.1)


def test_a_resumed_run_drops_the_lines_logged_after_its_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 9)))
    _logger(tmp_path, resume_step=4)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("cpu") is None and peak_flops(None) is None
