"""Process-group setup: launcher variables (Slurm translated), no process needed."""

from __future__ import annotations

import os


def test_slurm_variables_become_torch_distributed_ones(monkeypatch):
    # monkeypatch restores what it set; conftest's autouse fixture restores whatever else the code under test set
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
    # the first node of the list; the port from the job id, so that two jobs sharing a node do not collide:
    # 29500 (torch.distributed's default) + the job id's last three digits, 242
    assert os.environ["MASTER_ADDR"] == "gpu-node-17" and os.environ["MASTER_PORT"] == "29742"
    # variables a launcher already set win
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("SLURM_PROCID", "3")
    env_from_slurm()
    assert os.environ["RANK"] == "0"
    from launch.distributed import first_host

    assert first_host("cpu1,cpu2") == "cpu1" and first_host("a[007-009]") == "a007" and first_host("n5") == "n5"


def test_no_launcher_variable_leaks_from_an_earlier_test():
    # runs after the Slurm test in this file's order: its RANK / WORLD_SIZE / MASTER_ADDR are gone again
    assert os.environ.get("WORLD_SIZE") != "8" and os.environ.get("MASTER_ADDR") != "gpu-node-17"
