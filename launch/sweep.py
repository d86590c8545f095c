"""A study as one file: pretraining variants, each followed by its evaluations, as a shell script.

    python -m launch.sweep configs/sweeps/ablations.yaml > ablations.sh   # review, then run or submit
    python -m launch.sweep configs/sweeps/ablations.yaml --only concat     # one variant's commands

The sweep file names a pretraining recipe and launcher, the variants (name -> overrides on top of the
recipe), and the evaluation grid (protocol recipes x label fractions x seeds). Each variant pretrains
into ``<checkpoint_root>/<name>`` with ``resume=auto`` (a cut-off job continues where it stopped),
then every evaluation runs on that checkpoint into ``<run_root>/<name>/<protocol>-<labels>-seed<s>``
with one feature cache per variant; the last command aggregates every run over seeds
(`launch.evaluation.aggregate`). Before anything is printed, every command's configuration is loaded
against its schema, so a typo or an invalid combination fails here, naming the variant, and not in
the hundredth job on a cluster. The output is plain commands, one per line, in order: run it with
``bash -e``, or turn each line into a job of your scheduler.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launch.config import ConfigError, load_config, load_eval_config


@dataclass
class PretrainStage:
    recipe: str = MISSING
    """Pretraining recipe (configs/*.yaml)."""
    launcher: str = "deepspeed --num_gpus 8"
    """Prefix of each pretraining command; the script (launch/train.py) follows it."""
    checkpoint_root: str = MISSING
    """Each variant's checkpoint.dir is <checkpoint_root>/<variant> (any fsspec URL)."""
    overrides: list[str] = field(default_factory=list)
    """For every variant (data.manifest, ...); credentials never go here (see the README)."""


@dataclass
class EvaluateStage:
    launcher: str = "python -m launch.eval"
    """Prefix of each evaluation command (or e.g. ``deepspeed --num_gpus 8 launch/eval.py``)."""
    protocols: dict[str, str] = field(default_factory=dict)
    """protocol (linear, finetune) -> its evaluation recipe (configs/eval/*.yaml)."""
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: list[str] = field(default_factory=list)
    """For every evaluation (data.train_manifest, data.val_manifest, data.test_manifest, ...)."""


@dataclass
class Sweep:
    pretrain: PretrainStage = field(default_factory=PretrainStage)
    variants: dict[str, list[str]] = field(default_factory=dict)
    """name -> overrides on top of the recipe; [] is the recipe itself."""
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)
    run_root: str = "runs/sweep"
    """Local folder of every run's outputs (pretraining logs, results.json) and of the summary."""


def load_sweep(path: str) -> Sweep:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Sweep), OmegaConf.load(path))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{path}: required setting(s) not given: {', '.join(missing)}")
        sweep = OmegaConf.to_object(merged)
    except FileNotFoundError as err:
        raise ConfigError(f"sweep file not found: {path}") from err
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {err}") from err
    if not sweep.variants:
        raise ConfigError(f"{path}: no variants")
    for name in sweep.variants:
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{path}: variant name {name!r}: letters, digits, - and _ only (it names folders)")
    if set(sweep.evaluate.protocols) - {"linear", "finetune"}:
        raise ConfigError(f"{path}: evaluate.protocols: linear and finetune only, got {sorted(sweep.evaluate.protocols)}")
    return sweep


def _labels(fraction: float) -> str:
    return f"{fraction * 100:g}pct"


def commands(sweep: Sweep, only: Optional[Sequence[str]] = None, check: bool = True) -> list[list[str]]:
    """Every command of the sweep, in order, as argument lists; each configuration checked when ``check``."""
    p, e = sweep.pretrain, sweep.evaluate
    names = list(sweep.variants) if not only else list(only)
    unknown = sorted(set(names) - set(sweep.variants))
    if unknown:
        raise ConfigError(f"--only {unknown}: not among the variants {list(sweep.variants)}")
    out: list[list[str]] = []
    for name in names:
        ckpt = f"{p.checkpoint_root.rstrip('/')}/{name}"
        root = f"{sweep.run_root.rstrip('/')}/{name}"
        overrides = [*p.overrides, *sweep.variants[name], f"checkpoint.dir={ckpt}", f"run.dir={root}/pretrain",
                     "resume=auto"]
        if check:
            try:
                load_config(p.recipe, overrides)
            except ConfigError as err:
                raise ConfigError(f"variant {name!r}: {err}") from err
        out.append([*shlex.split(p.launcher), "launch/train.py", "--config", p.recipe, *overrides])
        for protocol, recipe in e.protocols.items():
            for fraction in e.label_fractions:
                for seed in e.seeds:
                    ev = [*e.overrides, f"eval.pretrained={ckpt}", f"eval.protocol={protocol}",
                          f"eval.label_fraction={fraction}", f"eval.seed={seed}",
                          f"eval.feature_cache_dir={root}/features",
                          f"run.dir={root}/{protocol}-{_labels(fraction)}-seed{seed}"]
                    if check:
                        try:
                            load_eval_config(recipe, ev)
                        except ConfigError as err:
                            raise ConfigError(f"variant {name!r}, {protocol} evaluation: {err}") from err
                    out.append([*shlex.split(e.launcher), "--config", recipe, *ev])
    out.append(["python", "-m", "launch.evaluation.aggregate", sweep.run_root.rstrip("/"),
                "--out", f"{sweep.run_root.rstrip('/')}/summary"])
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="the sweep file (configs/sweeps/*.yaml)")
    ap.add_argument("--only", nargs="+", help="these variants only (the aggregation still covers run_root)")
    ap.add_argument("--no-check", action="store_true", help="print without loading each configuration")
    args = ap.parse_args(argv)
    try:
        cmds = commands(load_sweep(args.sweep), args.only, check=not args.no_check)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"# {args.sweep}: {len(cmds) - 1} runs, then the summary; run with bash -e or one job per line")
    for cmd in cmds:
        print(shlex.join(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
