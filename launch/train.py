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

import argparse
import logging


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=20 model.fusion=concat")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from launch.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from launch.metrics import NonFiniteLoss
    from launch.trainer import Trainer

    try:
        Trainer(cfg).train()
    except (ConfigError, NonFiniteLoss) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
