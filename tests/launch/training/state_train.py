"""`launch/train.py` that also saves the state it resumed with, for the world-size test.

``STATE_DUMP=<folder>``: right after a checkpoint is loaded (at another world size: after DeepSpeed's universal
conversion), every rank saves the engine's state as it now holds it with DeepSpeed's own
``engine.save_checkpoint(<folder>, tag="loaded-step-N")``, the loader's position in its client state. The test
compares that with the checkpoint the earlier run committed. The observation lives here, not in the trainer:
this wrapper wraps `Trainer._load` before the trainer starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from launch import train  # noqa: E402
from launch.training.trainer import Trainer  # noqa: E402

real_load = Trainer._load


def load(self: Trainer, universal: bool) -> None:
    real_load(self, universal)
    self.engine.save_checkpoint(os.environ["STATE_DUMP"], tag=f"loaded-step-{self.step}",
                                client_state=self._client_state())


Trainer._load = load
sys.exit(train.main())
