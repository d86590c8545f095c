"""The checkpoint commit protocol interrupted at each of its points, by killing real rank processes on S3.

Each case commits ``step-00000002`` with two healthy ranks, then starts both ranks of ``step-00000004``
with one of them killed at one point of the protocol (`protocol_rank.py`: the production functions, the
fault in a wrapper around the filesystem). The test checks that the fault fired, then asks what
``resume=auto`` chooses (`checkpoint.resolve`, what the trainer calls): a checkpoint that was not
committed whole is never chosen. Expected values come from the protocol as the README states it
("latest" is written by rank 0 only after every rank's record, and names the checkpoint to resume).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import fresh_s3fs
from launch.training import checkpoint

pytestmark = pytest.mark.slow
SCRIPT = str(Path(__file__).with_name("protocol_rank.py"))
OLD, NEW = "step-00000002", "step-00000004"


def ranks(url: str, step: int, staging: Path, fault: str = "", faulty: int = -1, keep: int = 1,
          run_id: str = "run-a") -> list[subprocess.CompletedProcess]:
    """Both ranks of one checkpoint, as concurrent processes; rank ``faulty`` gets ``fault``."""
    env = {**__import__("os").environ, "PROTOCOL_STAGING": str(staging / str(step)), "PROTOCOL_COMMIT_TIMEOUT": "6",
           "PROTOCOL_KEEP": str(keep)}
    procs = [subprocess.Popen([sys.executable, SCRIPT, url, str(step), str(r), "2", run_id,
                               *([fault] if r == faulty else [])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


# (fault, rank killed) -> (what resume=auto chooses, whether the new checkpoint's folder is complete)
CASES = {
    ("mid-upload", 0): (OLD, False),
    ("mid-upload", 1): (OLD, False),
    ("before-record", 0): (OLD, False),
    ("before-record", 1): (OLD, False),
    ("after-record", 1): (NEW, True),    # its part was done: rank 0 commits
    ("after-record", 0): (OLD, True),    # complete, but never committed: `latest` still names the old one
    ("before-latest", 0): (OLD, True),
    ("after-latest", 0): (NEW, True),    # committed; the older one is pruned by the next commit
    ("mid-prune", 0): (NEW, True),
}


@pytest.mark.parametrize("fault,rank", sorted(CASES))
def test_an_interrupted_commit_is_never_chosen(fault, rank, s3_bucket, tmp_path):
    url = f"{s3_bucket}/ckpt"
    assert all(p.returncode == 0 for p in ranks(url, 2, tmp_path))
    procs = ranks(url, 4, tmp_path, fault, rank)
    killed, other = procs[rank], procs[1 - rank]
    assert killed.returncode == 17 and f"fault fired: {fault}" in killed.stdout, killed.stdout + killed.stderr
    chosen_tag, new_complete = CASES[(fault, rank)]
    if rank == 1:  # rank 0 lived: it committed exactly when rank 1's record made the checkpoint whole
        assert other.returncode == 0 and other.stdout.strip() == ("committed" if chosen_tag == NEW else "not committed")
    fs = fresh_s3fs()
    root = url[len("s3://"):]
    assert checkpoint.is_complete(fs, root, NEW, "run-a") is new_complete
    chosen = checkpoint.resolve("auto", url)
    assert chosen is not None and chosen.tag == chosen_tag and chosen.step == int(chosen_tag[-8:])
    assert checkpoint.is_complete(fs, root, chosen.tag, chosen.run_id)
    if fault == "after-latest":
        assert fs.exists(f"{root}/{OLD}")  # killed before pruning: still there, and still whole
    if fault == "mid-prune":
        assert not checkpoint.is_complete(fs, root, OLD, None)  # half deleted, and not what resume takes


def test_a_truncated_object_falls_back_to_the_newest_whole_checkpoint(s3_bucket, tmp_path, caplog):
    url = f"{s3_bucket}/ckpt"
    for step in (2, 4):
        assert all(p.returncode == 0 for p in ranks(url, step, tmp_path, keep=2))
    fs = fresh_s3fs()
    root = url[len("s3://"):]
    assert json.loads(fs.cat_file(f"{root}/latest"))["tag"] == NEW
    victim = f"{root}/{NEW}/rank1_part2.pt"
    fs.pipe_file(victim, fs.cat_file(victim)[:500])  # an object cut short after the commit
    chosen = checkpoint.resolve("auto", url)
    assert chosen.tag == OLD
    assert f"names {NEW}, but its files are incomplete" in caplog.text
