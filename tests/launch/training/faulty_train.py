"""`launch/train.py` with a fault injected into the checkpoint upload, for the interruption tests.

``FAULTY_UPLOAD=<tag>:<rank>``: that rank exits (``os._exit``, like a killed process) after uploading
half of its files of checkpoint ``<tag>``. The fault lives here, not in the production upload path:
this wrapper replaces the checkpoint module's ``put_atomic`` before the trainer starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from launch import train  # noqa: E402
from launch.training import checkpoint  # noqa: E402

TAG, RANK = os.environ["FAULTY_UPLOAD"].split(":")
real_put = checkpoint.put_atomic
uploaded: list[str] = []


def faulty_put(fs, local: str, dest: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank == int(RANK) and f"/{TAG}/" in dest:
        count = len(os.listdir(os.path.dirname(local)))
        if len(uploaded) == count // 2:
            print(f"fault injection: rank {rank} exits during the upload of {TAG}", flush=True)
            os._exit(17)
        uploaded.append(dest)
    real_put(fs, local, dest)


checkpoint.put_atomic = faulty_put
sys.exit(train.main())
