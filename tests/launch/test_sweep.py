"""The sweep file: the paper's ablations as commands, each configuration checked; a tiny sweep run for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, bigearthnet_shards, run_module
from launch.demo.launchers import free_port, training_env
from launch.sweep import commands, load_sweep

ABLATIONS = ROOT / "configs" / "sweeps" / "ablations.yaml"


def test_the_ablation_sweep_pretrains_every_variant_then_evaluates_each_at_three_fractions_and_seeds():
    cmds = commands(load_sweep(str(ABLATIONS)))  # every configuration loaded against its schema
    pretrain = [c for c in cmds if "launch/train.py" in c]
    evals = [c for c in cmds if "launch/eval.py" in c]
    assert len(pretrain) == 7 and len(evals) == 7 * 2 * 3 * 3 and len(cmds) == 7 + 126 + 1
    settings = [{a.split("=", 1)[0]: a.split("=", 1)[1] for a in c if "=" in a} for c in pretrain]
    assert [s.get("model.fusion", "xattn") for s in settings] == ["xattn", "concat", "stack", "s1", "s2", "xattn",
                                                                  "xattn"]
    assert settings[5]["model.decoder"] == "xattn" and settings[6]["model.masking"] == "independent"
    assert len({s["checkpoint.dir"] for s in settings}) == 7 and all(s["resume"] == "auto" for s in settings)
    runs = [next(a for a in c if a.startswith("run.dir=")) for c in evals]
    assert len(set(runs)) == len(runs)  # no two evaluations share a results folder
    grid = {(a, b, c) for a in ("linear", "finetune") for b in ("0.01", "0.1", "1.0") for c in "012"}
    for variant in ("xattn", "masking-independent"):
        mine = [dict(x.split("=", 1) for x in c if x.startswith("eval.")) for c in evals
                if f"eval.pretrained=s3://bucket/runs/ablations/{variant}" in c]
        assert {(m["eval.protocol"], m["eval.label_fraction"], m["eval.seed"]) for m in mine} == grid
    assert cmds[-1][1:] == ["-m", "launch.evaluation.aggregate", "runs/ablations", "--out", "runs/ablations/summary"]


def test_an_invalid_variant_is_refused_naming_it_before_anything_is_printed(tmp_path):
    sweep = yaml.safe_load(ABLATIONS.read_text())
    sweep["variants"]["s1-decoder-xattn"] = ["model.fusion=s1", "model.decoder=xattn"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(sweep))
    proc = run_module("launch.sweep", str(path), check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "variant 's1-decoder-xattn'" in proc.stderr and "model.decoder" in proc.stderr
    sweep["variants"] = {"typo": ["model.fusoin=concat"]}
    path.write_text(yaml.safe_dump(sweep))
    proc = run_module("launch.sweep", str(path), check=False)
    assert proc.returncode == 2 and "variant 'typo'" in proc.stderr and "fusoin" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_tiny_sweep_runs_as_printed_and_ends_in_a_summary(tmp_path):
    shards = bigearthnet_shards(tmp_path / "ben", n_patches=40, seed=3)
    manifests = {s: shards / s / "manifest.json" for s in ("train", "validation", "test")}
    sweep = {
        "pretrain": {"recipe": "configs/debug.yaml", "checkpoint_root": str(tmp_path / "ckpt"),
                     "launcher": f"{sys.executable} -m deepspeed.launcher.runner --num_gpus 2 "
                                 f"--master_port {free_port()}",
                     "overrides": [f"data.manifest={manifests['train']}", "train.max_steps=3",
                                   "checkpoint.every_steps=3", "data.num_workers=1"]},
        "variants": {"xattn": []},
        "evaluate": {"launcher": f"{sys.executable} -m launch.eval",
                     "protocols": {"linear": "configs/eval/debug_linear.yaml"}, "label_fractions": [0.5],
                     "seeds": [0, 1],
                     "overrides": [f"data.train_manifest={manifests['train']}",
                                   f"data.val_manifest={manifests['validation']}",
                                   f"data.test_manifest={manifests['test']}", "eval.epochs=3"]},
        "run_root": str(tmp_path / "runs"),
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(sweep))
    script = run_module("launch.sweep", str(tmp_path / "tiny.yaml")).stdout
    assert len([line for line in script.splitlines() if line and not line.startswith("#")]) == 1 + 2 + 1
    env = training_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ckpt" / "xattn" / "latest").read_text())["tag"] == "step-00000003"
    rows = json.loads((tmp_path / "runs" / "summary" / "summary.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["seeds"] == [0, 1] and rows[0]["label_fraction"] == 0.5
    for seed in (0, 1):
        doc = json.loads((tmp_path / "runs" / "xattn" / f"linear-50pct-seed{seed}" / "results.json").read_text())
        assert rows[0]["map_macro"]["values"][seed] == doc["map_macro"]
        assert doc["settings"]["pretrained"] == str(tmp_path / "ckpt" / "xattn")
