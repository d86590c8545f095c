"""The commit protocol on a real folder: what counts as committed, what is never loaded."""

from __future__ import annotations

import json

import pytest

from launch.training import checkpoint
from launch.training.checkpoint import CheckpointError, Committed
from pipeline.storage import sha256_file, url_to_fs


def write_step(root, tag, ranks, world, run_id="r1", files=("a.pt",)):
    fs, path = url_to_fs(str(root))
    for rank in ranks:
        local = root / tag
        local.mkdir(parents=True, exist_ok=True)
        entries = []
        for name in files:
            p = local / f"{rank}-{name}"
            p.write_bytes(b"x" * (rank + 3))
            entries.append({"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(str(p))})
        checkpoint.write_rank_record(fs, path, tag, rank, world, run_id, entries, step=int(tag[-2:]))


def test_commit_needs_every_rank_and_latest_names_only_complete_steps(tmp_path):
    fs, root = url_to_fs(str(tmp_path))
    write_step(tmp_path, "step-00000002", [0, 1], 2)
    assert checkpoint.commit(fs, root, "step-00000002", "r1", {"step": 2, "world_size": 2}, keep=2)
    write_step(tmp_path, "step-00000004", [0], 2)  # rank 1 never finished
    assert not checkpoint.commit(fs, root, "step-00000004", "r1", {"step": 4, "world_size": 2}, keep=2, timeout_s=0.2)
    assert json.loads((tmp_path / "latest").read_text())["tag"] == "step-00000002"
    assert checkpoint.find_latest(str(tmp_path)).tag == "step-00000002"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.find_step(str(tmp_path / "step-00000004"))


def test_fetch_refuses_a_step_without_its_rank_records(tmp_path):
    write_step(tmp_path, "step-00000002", [0, 1], 2)
    for record in (tmp_path / "step-00000002" / "_ranks").glob("*.json"):
        record.unlink()
    with pytest.raises(CheckpointError, match="rank records are missing"):
        checkpoint.fetch(Committed(str(tmp_path), "step-00000002", 2, 2, 0, "r1"), str(tmp_path / "dl"))


def test_a_latest_naming_an_incomplete_step_falls_back_with_a_warning(tmp_path, caplog):
    fs, root = url_to_fs(str(tmp_path))
    write_step(tmp_path, "step-00000002", [0, 1], 2)
    write_step(tmp_path, "step-00000004", [0], 2)
    (tmp_path / "latest").write_text(json.dumps({"tag": "step-00000004", "step": 4, "world_size": 2, "run_id": "r1"}))
    with caplog.at_level("WARNING"):
        found = checkpoint.find_latest(str(tmp_path))
    assert found.tag == "step-00000002" and "names step-00000004, but its files are incomplete" in caplog.text


def test_an_abandoned_commit_writes_nothing_and_stops_waiting(tmp_path):
    # The run stops on an error and gives its folder back while rank 0's commit waits for a rank that will never
    # upload: the commit gives up at once and writes no `latest` (a run that took the folder over owns it now).
    import threading
    import time

    fs, root = url_to_fs(str(tmp_path))
    write_step(tmp_path, "step-00000002", [0], 2)  # rank 1 never finishes
    abandoned = checkpoint.Abandon()
    threading.Timer(0.3, abandoned.set).start()
    started = time.monotonic()
    assert not checkpoint.commit(fs, root, "step-00000002", "r1", {"step": 2, "world_size": 2}, keep=2,
                                 timeout_s=60, abandoned=abandoned)
    assert time.monotonic() - started < 10 and not (tmp_path / "latest").exists()
    write_step(tmp_path, "step-00000002", [1], 2)  # complete now, but abandoned: still nothing committed
    assert not checkpoint.commit(fs, root, "step-00000002", "r1", {"step": 2, "world_size": 2}, keep=2,
                                 abandoned=abandoned)
    assert not (tmp_path / "latest").exists()
