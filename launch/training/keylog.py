"""Which samples each optimizer step saw, per rank: an audit of the data order.

With ``train.log_sample_keys=true`` every rank appends one line per step to
``<run.dir>/sample_keys/rank-NNNNN.jsonl``: ``{"step": s, "keys": [...]}``, the keys of its
micro-batches in the order they were consumed (gradient accumulation: all of them). An exact
resume gives the same lines as the uninterrupted run; a resumed run first drops the lines the
interrupted one wrote after its checkpoint, as `MetricsLogger` does for ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

FOLDER = "sample_keys"


def key_log_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, FOLDER, f"rank-{rank:05d}.jsonl")


class SampleKeyLog:
    def __init__(self, run_dir: str, rank: int, resume_step: int = 0):
        self.path = key_log_path(run_dir, rank)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        self._file = open(self.path, "a")

    def write(self, step: int, keys: Sequence[str]) -> None:
        self._file.write(json.dumps({"step": step, "keys": list(keys)}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_key_log(run_dir: str, rank: int) -> list[dict]:
    with open(key_log_path(run_dir, rank)) as f:
        return [json.loads(ln) for ln in f if ln.strip()]
