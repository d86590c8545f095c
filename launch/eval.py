"""Evaluate a pretrained Fus-MAE encoder on BigEarthNet-MM: linear probing or fine-tuning.

    python -m launch.eval --config configs/eval/bigearthnet_linear.yaml \\
        eval.pretrained=s3://bucket/runs/vit_b data.train_manifest=s3://bucket/ben/train/manifest.json \\
        data.val_manifest=... data.test_manifest=... eval.label_fraction=0.1 run.dir=runs/ben-linear-10

    deepspeed --num_gpus 8 launch/eval.py --config configs/eval/bigearthnet_finetune.yaml eval.pretrained=...
    torchrun --nproc_per_node 8 launch/eval.py --config configs/eval/bigearthnet_finetune.yaml eval.pretrained=...

`eval.pretrained` is a training checkpoint folder (its `latest` step), one `step-N` folder, an exported
encoder folder (`launch.export`, or an older `encoder.safetensors`), or `none` for the random-initialisation baseline. Results go to
`<run.dir>/results.json` and a table on stdout; see the `launch.evaluation` package.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed launch/eval.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from launch.cli import parse_args, run_job

    args = parse_args(__doc__, "configs/eval/*.yaml", "eval.label_fraction=0.1 eval.seed=1", argv)
    from launch.config import load_eval_config

    def evaluate(cfg) -> None:
        from launch.evaluation import evaluate

        evaluate(cfg)

    return run_job(args, load_eval_config, evaluate)


if __name__ == "__main__":
    sys.exit(main())
