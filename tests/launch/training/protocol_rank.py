"""One rank of a checkpoint commit, as a real process, with a fault injected at one point of the protocol.

    python protocol_rank.py <checkpoint URL> <step> <rank> <world size> <run id> [<fault>]

The rank uploads three files of random bytes for ``step-<step>`` (`upload_files`), then its rank record
(`write_rank_record`); rank 0 then commits (`commit`: waits for every record, writes ``latest``, prunes
beyond ``PROTOCOL_KEEP``, default 1). The checkpoint functions are the production ones; the fault lives in a wrapper around the
filesystem object they are given, and kills the process (``os._exit``, like a killed rank) at:

``mid-upload``       before the second of its three files
``before-record``    after its files, before its rank record
``after-record``     right after its rank record (rank 0: before it commits)
``before-latest``    rank 0: every record there, before ``latest`` is written
``after-latest``     rank 0: after ``latest``, before pruning
``mid-prune``        rank 0: pruning, after the first object of an older checkpoint is deleted

It prints ``fault fired: <fault>`` before exiting with 17, so a test knows the fault happened.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from launch.training import checkpoint  # noqa: E402
from pipeline.storage import url_to_fs  # noqa: E402

URL, STEP, RANK, WORLD, RUN_ID = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
FAULT = sys.argv[6] if len(sys.argv) > 6 else ""


def fire() -> None:
    print(f"fault fired: {FAULT}", flush=True)
    os._exit(17)


class FaultyFS:
    """The real filesystem, with the fault at its point."""

    def __init__(self, fs):
        self._fs = fs
        self._puts = 0

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def put_file(self, local, dest, **kw):
        self._puts += 1
        if FAULT == "mid-upload" and self._puts == 2:
            fire()
        return self._fs.put_file(local, dest, **kw)

    def pipe_file(self, path, data, **kw):
        is_record, is_latest = f"/{checkpoint.RANKS_DIR}/rank{RANK}.json" in path, path.endswith(f"/{checkpoint.LATEST}")
        if (FAULT == "before-record" and is_record) or (FAULT == "before-latest" and is_latest):
            fire()
        out = self._fs.pipe_file(path, data, **kw)
        if (FAULT == "after-record" and is_record) or (FAULT == "after-latest" and is_latest):
            fire()
        return out

    def rm(self, path, recursive=False, **kw):
        if FAULT == "mid-prune":
            first = sorted(self._fs.find(path))[0]
            self._fs.rm_file(first)
            fire()
        return self._fs.rm(path, recursive=recursive, **kw)


fs, root = url_to_fs(URL)
fs = FaultyFS(fs)
root = root.rstrip("/")
tag = checkpoint.tag_for(STEP)
staging = Path(os.environ["PROTOCOL_STAGING"]) / f"rank{RANK}"
staging.mkdir(parents=True, exist_ok=True)
paths = []
for i in range(3):
    p = staging / f"rank{RANK}_part{i}.pt"
    p.write_bytes(os.urandom(1000 + 100 * i))
    paths.append(str(p))
files = checkpoint.upload_files(fs, root, tag, paths)
checkpoint.write_rank_record(fs, root, tag, RANK, WORLD, RUN_ID, files, step=STEP, zero_stage=2)
if RANK == 0:
    ok = checkpoint.commit(fs, root, tag, RUN_ID, {"step": STEP, "world_size": WORLD, "zero_stage": 2},
                           keep=int(os.environ.get("PROTOCOL_KEEP", "1")),
                           timeout_s=float(os.environ.get("PROTOCOL_COMMIT_TIMEOUT", "20")))
    print("committed" if ok else "not committed", flush=True)
