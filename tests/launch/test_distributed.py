"""Process-group setup: launcher variables (Slurm translated), no process needed."""

from __future__ import annotations

import os


def test_slurm_variables_become_torch_distributed_ones(monkeypatch):
    from launch.distributed import env_from_slurm

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        # setenv first: monkeypatch then restores the variable's absence too (a bare delenv of an absent
        # variable records nothing, and the values set below would leak into later tests)
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-node-[17-18,31]")  # no scontrol here: parsed
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    env_from_slurm()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    assert os.environ["MASTER_ADDR"] == "gpu-node-17" and os.environ["MASTER_PORT"] == str(29500 + 4242 % 1000)
    # variables a launcher already set win
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("SLURM_PROCID", "3")
    env_from_slurm()
    assert os.environ["RANK"] == "0"
    from launch.distributed import first_host

    assert first_host("cpu1,cpu2") == "cpu1" and first_host("a[007-009]") == "a007" and first_host("n5") == "n5"
