"""Pretrain Fus-MAE with DeepSpeed.

    deepspeed --num_gpus 8 launch/train.py --config configs/vit_b.yaml data.manifest=s3://bucket/shards/manifest.json \\
        checkpoint.dir=s3://bucket/runs/vit_b resume=auto

Also runs under `torchrun` and Slurm `srun` (RANK / WORLD_SIZE / LOCAL_RANK or SLURM_* variables), and on CPU
(DeepSpeed picks its CPU accelerator and gloo when there is no GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed launch/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from launch.cli import parse_args, run_job

    args = parse_args(__doc__, "configs/*.yaml", "train.max_steps=20 model.fusion=concat", argv)
    from launch.config import load_config
    from launch.training.metrics import NonFiniteLoss

    def train(cfg) -> None:
        from launch.training.trainer import Trainer
        from pipeline.signals import sigterm_as_exit

        # SIGTERM (a launcher stopping the ranks after one failed, a preemption, scancel) stops the run through
        # the error path below instead of killing it on the spot: checkpoint.dir is given back at once.
        with sigterm_as_exit(what="training"):
            trainer = Trainer(cfg)
            try:
                trainer.train()
            except BaseException as err:  # a non-finite loss, an outage, Ctrl-C, SIGTERM: checkpoint.dir is given back
                trainer.release_lease(err)
                raise

    return run_job(args, load_config, train, user_errors=(NonFiniteLoss,))


if __name__ == "__main__":
    sys.exit(main())
