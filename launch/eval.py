"""Evaluate a pretrained Fus-MAE encoder on BigEarthNet-MM: linear probing or fine-tuning.

    python -m launch.eval --config configs/eval/bigearthnet_linear.yaml \\
        eval.pretrained=s3://bucket/runs/vit_b data.train_manifest=s3://bucket/ben/train/manifest.json \\
        data.val_manifest=... data.test_manifest=... eval.label_fraction=0.1 run.dir=runs/ben-linear-10

    deepspeed --num_gpus 8 launch/eval.py --config configs/eval/bigearthnet_finetune.yaml eval.pretrained=...
    torchrun --nproc_per_node 8 launch/eval.py --config configs/eval/bigearthnet_finetune.yaml eval.pretrained=...

`eval.pretrained` is a training checkpoint folder (its `latest` step), one `step-N` folder, an exported
`encoder.safetensors` (or its folder), or `none` for the random-initialisation baseline. Results go to
`<run.dir>/results.json` and a table on stdout; see launch/evaluate.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed launch/eval.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import logging


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML recipe (configs/eval/*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.label_fraction=0.1 eval.seed=1")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from launch.config import ConfigError
    from launch.eval_config import load_eval_config

    try:
        cfg = load_eval_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from launch.evaluate import evaluate

    try:
        evaluate(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
