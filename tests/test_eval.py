"""Downstream evaluation: schema, metrics, label subsets, and linear / fine-tune runs end to end.

The end-to-end tests use a BigEarthNet-layout archive made by `pipeline.synthetic`, preprocessed by the
real pipeline, and pretraining checkpoints written by the real training script (`deepspeed`, 2 CPU ranks)
with ZeRO 2 and ZeRO 3.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, S3_ENV, run_module
from launch.config import ConfigError
from launch.eval_config import EvalConfig, load_eval_config
from launch.evaluate import (
    Classifier,
    EvalData,
    MemoryCache,
    Runtime,
    average_precision,
    evaluate,
    layer_decay_groups,
    load_pretrained,
    multilabel_metrics,
    select_subset,
    subset_size,
)
from model import FusMAE, FusMAEConfig
from pipeline import synthetic
from pipeline.sources.bigearthnet import BIGEARTHNET_19_CLASSES

DEBUG_LINEAR = str(ROOT / "configs" / "eval" / "debug_linear.yaml")
EVAL_RECIPES = sorted((ROOT / "configs" / "eval").glob("*.yaml"))
FAST_FINETUNE = ["eval.protocol=finetune", "eval.epochs=2", "eval.batch_size=8", "eval.lr=1e-3"]


# ----------------------------------------------------------------------------- fixtures


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed(ranks: int, script: str, config: str, *overrides: str) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N <script> --config <config> overrides...` on CPU, output to files (not pipes)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(_port()),
           str(ROOT / script), "--config", config, *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, timeout=600).returncode
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, code, out.read(), err.read())
    if proc.returncode != 0:
        raise AssertionError(f"deepspeed exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n"
                             f"{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def ben(tmp_path_factory) -> dict[str, str]:
    """BigEarthNet-layout shards: 60 patches of 48 px, 20 per split, written by the real pipeline."""
    root = tmp_path_factory.mktemp("ben")
    synthetic.make_bigearthnet(str(root / "archive"), n_patches=60, size=48, seed=5)
    run_module("pipeline.preprocess", "--no-progress", "--source", "bigearthnet", "--input", str(root / "archive"),
               "--output", str(root / "shards"), "--split", "all", "--workers", "1")
    shards = root / "shards"
    return {"train": str(shards / "train" / "manifest.json"), "val": str(shards / "validation" / "manifest.json"),
            "test": str(shards / "test" / "manifest.json")}


def _pretrain(tmp_path_factory, ben: dict[str, str], stage: int) -> Path:
    """A short pretraining run of configs/debug.yaml on the BigEarthNet training shards (12 S2 bands)."""
    run = tmp_path_factory.mktemp(f"pretrain_zero{stage}")
    deepspeed(2, "launch/train.py", str(ROOT / "configs" / "debug.yaml"), f"data.manifest={ben['train']}",
              "model.s2_channels=12", "data.image_size=32", "data.num_workers=1", "train.max_steps=4",
              "train.log_every=2", "checkpoint.every_steps=4", f"deepspeed.zero_stage={stage}",
              f"checkpoint.dir={run / 'ckpt'}", f"run.dir={run}")
    assert json.loads((run / "ckpt" / "latest").read_text())["tag"] == "step-00000004"
    assert (run / "ckpt" / "encoder.safetensors").exists()
    return run / "ckpt"


@pytest.fixture(scope="module")
def zero0(tmp_path_factory, ben) -> Path:
    return _pretrain(tmp_path_factory, ben, 0)


@pytest.fixture(scope="module")
def zero2(tmp_path_factory, ben) -> Path:
    return _pretrain(tmp_path_factory, ben, 2)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, ben) -> Path:
    return _pretrain(tmp_path_factory, ben, 3)


def data_overrides(ben: dict[str, str]) -> list[str]:
    return [f"data.train_manifest={ben['train']}", f"data.val_manifest={ben['val']}",
            f"data.test_manifest={ben['test']}"]


def eval_cfg(ben: dict[str, str], run_dir: Path, pretrained: str, *overrides: str) -> EvalConfig:
    return load_eval_config(DEBUG_LINEAR, [*data_overrides(ben), f"eval.pretrained={pretrained}",
                                           f"run.dir={run_dir}", *overrides])


def check_results(doc: dict, run_dir: Path) -> None:
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(doc))
    for key in ("map_macro", "map_micro", "f1", "f1_macro"):
        assert 0.0 <= on_disk[key] <= 1.0, key
    ap = on_disk["per_class_ap"]
    assert list(ap) == list(BIGEARTHNET_19_CLASSES)
    assert all(v is None or 0.0 <= v <= 1.0 for v in ap.values())
    present = [v for v in ap.values() if v is not None]
    assert present and on_disk["map_macro"] == pytest.approx(np.mean(present))
    s = on_disk["settings"]
    for key in ("protocol", "label_fraction", "seed", "pretrained", "model", "epochs", "best_epoch", "val_map_macro",
                "train_subset"):
        assert key in s, key
    assert 1 <= s["best_epoch"] <= s["epochs"]
    assert s["train_subset"]["size"] >= 1 and len(s["train_subset"]["keys_sha256"]) == 64


# ----------------------------------------------------------------------------- schema


REQUIRED = ["eval.pretrained=none", "data.train_manifest=memory://ben/train/manifest.json",
            "data.val_manifest=memory://ben/validation/manifest.json", "data.test_manifest=memory://ben/test/manifest.json"]


def test_eval_recipes_exist():
    assert {p.name for p in EVAL_RECIPES} >= {"bigearthnet_linear.yaml", "bigearthnet_finetune.yaml",
                                              "debug_linear.yaml"}


@pytest.mark.parametrize("path", EVAL_RECIPES, ids=lambda p: p.name)
def test_every_eval_recipe_loads_against_the_schema(path):
    cfg = load_eval_config(str(path), REQUIRED)
    assert isinstance(cfg, EvalConfig)
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():
        for key, value in (values or {}).items():
            if value == "???":
                continue
            got = getattr(getattr(cfg, section), key)
            assert got == value or list(got) == value, f"{path.name}: {section}.{key}"
    assert cfg.model.img_size == cfg.data.image_size
    FusMAE(cfg.model)  # the baseline architecture of every recipe builds


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["eval.protocl=linear"], r"eval\.protocl"),
        (["eval.protocol=knn"], r"eval\.protocol"),
        (["eval.label_fraction=0"], r"eval\.label_fraction"),
        (["eval.label_fraction=1.5"], r"eval\.label_fraction"),
        (["eval.layer_decay=0"], r"eval\.layer_decay"),
        (["eval.resume=sometimes"], r"eval\.resume"),
        (["eval.stop_at_epoch=1"], r"eval\.stop_at_epoch"),
        (["eval.epochs=abc"], r"eval\.epochs"),
        (["data.image_size=30"], r"data\.image_size"),
    ],
)
def test_eval_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_eval_config(DEBUG_LINEAR, REQUIRED + overrides)


def test_missing_pretrained_is_named():
    with pytest.raises(ConfigError, match=r"eval\.pretrained"):
        load_eval_config(DEBUG_LINEAR, REQUIRED[1:])


# ----------------------------------------------------------------------------- metrics


def test_metrics_match_scikit_learn():
    from sklearn.metrics import average_precision_score, f1_score

    rng = np.random.default_rng(0)
    N, C = 300, 7
    y = (rng.random((N, C)) < [0.5, 0.3, 0.1, 0.02, 0.6, 0.2, 0.0]).astype(np.uint8)
    y[0, 3] = 1  # class 3 rare but present; class 6 absent
    logits = rng.normal(size=(N, C)) + 1.5 * y
    probs = 1 / (1 + np.exp(-logits))
    probs[:40, 1] = 0.5  # ties, and a tie at the threshold
    probs = np.round(probs, 2)  # many more ties
    names = [f"c{i}" for i in range(C)]
    m = multilabel_metrics(y, probs, names)

    present = y.sum(0) > 0
    for c in range(C):
        if present[c]:
            assert m["per_class_ap"][names[c]] == pytest.approx(average_precision_score(y[:, c], probs[:, c]), abs=1e-12)
        else:
            assert m["per_class_ap"][names[c]] is None
    assert m["map_macro"] == pytest.approx(average_precision_score(y[:, present], probs[:, present], average="macro"))
    assert m["map_micro"] == pytest.approx(average_precision_score(y, probs, average="micro"))
    pred = (probs >= 0.5).astype(int)
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="micro"))
    assert m["f1_macro"] == pytest.approx(f1_score(y[:, present], pred[:, present], average="macro"))
    assert m["classes_present"] == int(present.sum()) == 6
    assert average_precision(np.zeros(5), np.arange(5)) is None
    assert average_precision(np.ones(4), np.zeros(4)) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- label subsets


def _labels(seed: int = 0) -> np.ndarray:
    """2000 multi-label samples over 19 classes: frequent, rare (3, 2, 1 carriers) and one absent class."""
    rng = np.random.default_rng(seed)
    p = np.linspace(0.02, 0.5, 19)
    y = (rng.random((2000, 19)) < p).astype(np.uint8)
    y[:, 0] = 0
    y[:, 1] = 0
    y[[10, 500, 1500], 1] = 1
    y[:, 2] = 0
    y[[7, 1999], 2] = 1
    y[:, 3] = 0
    y[1234, 3] = 1
    y[:, 18] = 0  # absent
    return y


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_label_subset_is_seeded_sized_and_covers_every_class(fraction):
    y = _labels()
    a = select_subset(y, fraction, seed=3)
    assert np.array_equal(a, select_subset(y, fraction, seed=3))  # deterministic
    assert not np.array_equal(a, select_subset(y, fraction, seed=4))  # another seed, another subset
    assert len(a) == subset_size(len(y), fraction) == round(fraction * len(y))
    assert len(set(a.tolist())) == len(a) and np.all(np.diff(a) > 0)
    present = y.sum(0) > 0
    assert np.array_equal(y[a].sum(0) > 0, present)  # 20 samples are enough for the 17 present classes
    if fraction >= 0.1:  # stratified: the frequent classes keep roughly their share
        share, full = y[a].mean(0), y.mean(0)
        frequent = full > 0.1
        assert np.all(np.abs(share[frequent] - full[frequent]) < 0.25 * full[frequent])


def test_label_subset_edge_cases():
    y = _labels()
    assert np.array_equal(select_subset(y, 1.0, seed=0), np.arange(len(y)))
    tiny = select_subset(y, 0.002, seed=0)  # 4 samples cannot cover 17 classes: the rarest come first
    assert len(tiny) == 4
    assert {1234, 7, 1999} & set(tiny.tolist()) and y[tiny, 3].sum() == 1


# ----------------------------------------------------------------------------- layer decay


def test_layer_decay_groups_scale_by_depth():
    net = FusMAE(FusMAEConfig.preset("tiny", s2_channels=12, patch_size=8, img_size=32))
    model = Classifier(net, 19)
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5, encoder_lr_scale=0.1)
    n = len(net.blocks)
    by_name = {name: g for g in groups for name in g["names"]}
    assert by_name["head.weight"]["lr"] == 1.0 and by_name["head.weight"]["weight_decay"] == 0.05
    assert by_name["head.bias"]["weight_decay"] == 0.0
    assert by_name["encoder.norm.weight"]["lr"] == pytest.approx(0.1)
    assert by_name[f"encoder.blocks.{n - 1}.mlp.fc1.weight"]["lr"] == pytest.approx(0.1 * 0.5)
    assert by_name["encoder.blocks.0.s1_from_s2.mlp.fc1.weight"]["lr"] == pytest.approx(0.1 * 0.5 ** n)
    assert by_name["encoder.patch_embed.s2.proj.weight"]["lr"] == pytest.approx(0.1 * 0.5 ** (n + 1))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("source, protocol", [
    ("zero0", "linear"),
    ("zero2", "linear"), ("zero2", "finetune"),
    ("zero3", "linear"), ("zero3", "finetune"),
    ("export", "linear"), ("export", "finetune"),
])
def test_end_to_end_from_every_kind_of_checkpoint(request, ben, tmp_path, source, protocol):
    # a checkpoint folder (its `latest`), a step-N folder, the exported safetensors file
    ckpt = request.getfixturevalue("zero2" if source == "export" else source)
    pretrained = {"zero0": str(ckpt), "zero2": str(ckpt), "zero3": str(ckpt / "step-00000004"),
                  "export": str(ckpt / "encoder.safetensors")}[source]
    extra = FAST_FINETUNE if protocol == "finetune" else []
    doc = evaluate(eval_cfg(ben, tmp_path, pretrained, *extra), memory=MemoryCache())
    check_results(doc, tmp_path)
    s = doc["settings"]
    assert s["protocol"] == protocol
    assert s["pretrained_info"]["kind"] == ("export" if source == "export" else "zero-checkpoint")
    if source != "export":
        assert s["pretrained_info"]["zero_stage"] == int(source[-1])
        assert s["pretrained_info"]["tag"] == "step-00000004"
    assert s["model"]["s2_channels"] == 12 and s["model"]["img_size"] == 32
    assert s["train_subset"]["size"] == 20 and s["train_subset"]["of"] == 20
    if protocol == "linear":
        assert list(tmp_path.glob("features-*.pt"))
    else:
        assert len(doc["history"]) == 2 and (tmp_path / "checkpoint" / "latest").exists()


@pytest.mark.slow
def test_linear_probe_is_deterministic_and_reuses_cached_features(ben, zero2, tmp_path, capsys):
    shared = tmp_path / "features"
    a = evaluate(eval_cfg(ben, tmp_path / "a", str(zero2), "eval.label_fraction=0.5",
                          f"eval.feature_cache_dir={shared}"), memory=MemoryCache())
    assert "cached in" not in capsys.readouterr().out
    b = evaluate(eval_cfg(ben, tmp_path / "b", str(zero2), "eval.label_fraction=0.5",
                          f"eval.feature_cache_dir={shared}"), memory=MemoryCache())
    assert capsys.readouterr().out.count("cached in") == 3  # train, val, test from the shared folder
    assert len(list(shared.glob("features-*.pt"))) == 3
    for key in ("map_macro", "map_micro", "f1", "f1_macro", "per_class_ap"):
        assert a[key] == b[key]
    assert a["settings"]["train_subset"] == b["settings"]["train_subset"]
    assert a["settings"]["train_subset"]["size"] == 10
    # another seed draws another subset of the same size
    c = evaluate(eval_cfg(ben, tmp_path / "c", str(zero2), "eval.label_fraction=0.5", "eval.seed=1",
                          f"eval.feature_cache_dir={shared}"), memory=MemoryCache())
    assert c["settings"]["train_subset"]["size"] == 10
    assert c["settings"]["train_subset"]["keys_sha256"] != a["settings"]["train_subset"]["keys_sha256"]


@pytest.mark.slow
def test_encoder_from_zero3_checkpoint_equals_the_export(ben, zero3, tmp_path):
    rt = Runtime()
    data = EvalData(eval_cfg(ben, tmp_path, "none"), rt)
    from_ckpt = load_pretrained(eval_cfg(ben, tmp_path, str(zero3)), data.manifests, rt)
    from_export = load_pretrained(eval_cfg(ben, tmp_path, str(zero3 / "encoder.safetensors")), data.manifests, rt)
    a, b = from_ckpt.net.encoder_state_dict(), from_export.net.encoder_state_dict()
    assert sorted(a) == sorted(b) and len(a) > 10
    for k in a:
        # fp32 pretraining: the consolidated ZeRO partitions and the gathered export agree to fp32 rounding
        # (a bf16 run would need rtol ~1e-2: the export is of the bf16 module, zero_to_fp32 of the fp32 master)
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-6, atol=1e-6)
    # and neither is the initialisation
    fresh = FusMAE(from_ckpt.cfg).encoder_state_dict()
    assert any(not torch.equal(a[k], fresh[k]) for k in a if k.startswith("blocks"))


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["xattn", "concat", "stack", "s1", "s2"])
def test_random_init_baseline_for_every_fusion(ben, tmp_path, fusion):
    lin = evaluate(eval_cfg(ben, tmp_path / "linear", "none", f"model.fusion={fusion}", "eval.epochs=5"),
                   memory=MemoryCache())
    check_results(lin, tmp_path / "linear")
    assert lin["settings"]["pretrained_info"]["kind"] == "none" and lin["settings"]["model"]["fusion"] == fusion
    ft = evaluate(eval_cfg(ben, tmp_path / "ft", "none", f"model.fusion={fusion}", *FAST_FINETUNE, "eval.epochs=1",
                           "data.augment=false"), memory=MemoryCache())
    check_results(ft, tmp_path / "ft")


@pytest.mark.slow
def test_command_line_baseline(ben, tmp_path):
    proc = run_module("launch.eval", "--config", DEBUG_LINEAR, *data_overrides(ben), "eval.pretrained=none",
                      f"run.dir={tmp_path}", "eval.epochs=5")
    assert "mAP macro" in proc.stdout and "Urban fabric" in proc.stdout
    doc = json.loads((tmp_path / "results.json").read_text())
    check_results(doc, tmp_path)
    assert (tmp_path / "eval_config.yaml").exists()
    proc = run_module("launch.eval", "--config", DEBUG_LINEAR, *data_overrides(ben), f"run.dir={tmp_path}",
                      check=False)
    assert proc.returncode == 2 and "eval.pretrained" in proc.stderr


@pytest.mark.slow
def test_mismatched_or_missing_checkpoints_fail_clearly(ben, tmp_path):
    from launch.export import export_encoder

    cfg13 = FusMAEConfig.preset("tiny", patch_size=8, s2_channels=13, img_size=32)
    export_encoder(FusMAE(cfg13).encoder_state_dict(), cfg13, {}, str(tmp_path / "l1c"))
    with pytest.raises(ConfigError, match=r"model\.s2_channels=13.*12 S2 bands"):
        evaluate(eval_cfg(ben, tmp_path / "run", str(tmp_path / "l1c" / "encoder.safetensors")), memory=MemoryCache())
    with pytest.raises(ConfigError, match=r"model\.s2_channels=13"):
        evaluate(eval_cfg(ben, tmp_path / "run", str(tmp_path / "l1c")), memory=MemoryCache())
    cfg12 = FusMAEConfig.preset("tiny", patch_size=8, s2_channels=12, img_size=32)
    export_encoder(FusMAE(cfg12).encoder_state_dict(), cfg12, {}, str(tmp_path / "l2a"))
    with pytest.raises(ConfigError, match=r"data\.image_size=36.*patch_size=8"):
        evaluate(eval_cfg(ben, tmp_path / "run", str(tmp_path / "l2a"), "data.image_size=36"), memory=MemoryCache())
    with pytest.raises(ConfigError, match=r"eval\.pretrained=.*nowhere.*not found"):
        evaluate(eval_cfg(ben, tmp_path / "run", str(tmp_path / "nowhere")), memory=MemoryCache())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"neither a checkpoint nor an exported encoder"):
        evaluate(eval_cfg(ben, tmp_path / "run", str(tmp_path / "empty")), memory=MemoryCache())
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_finetune_resume_gives_the_uninterrupted_results(ben, zero2, tmp_path, capsys):
    args = [*FAST_FINETUNE, "eval.epochs=3", "eval.label_fraction=0.5"]
    full = evaluate(eval_cfg(ben, tmp_path / "full", str(zero2), *args), memory=MemoryCache())
    part = evaluate(eval_cfg(ben, tmp_path / "part", str(zero2), *args, "eval.stop_at_epoch=1"), memory=MemoryCache())
    assert part is None and not (tmp_path / "part" / "results.json").exists()
    assert json.loads((tmp_path / "part" / "checkpoint" / "latest").read_text())["epoch"] == 1
    with pytest.raises(ConfigError, match=r"eval\.resume=auto"):  # never silently restarts over a checkpoint
        evaluate(eval_cfg(ben, tmp_path / "part", str(zero2), *args), memory=MemoryCache())
    with pytest.raises(ConfigError, match=r"eval\.lr"):  # nor continues with other settings
        evaluate(eval_cfg(ben, tmp_path / "part", str(zero2), *args, "eval.resume=auto", "eval.lr=0.1"),
                 memory=MemoryCache())
    capsys.readouterr()
    resumed = evaluate(eval_cfg(ben, tmp_path / "part", str(zero2), *args, "eval.resume=auto"), memory=MemoryCache())
    assert "after epoch 1" in capsys.readouterr().out
    assert resumed["history"] == full["history"]
    for key in ("map_macro", "map_micro", "f1", "f1_macro", "per_class_ap"):
        assert resumed[key] == full[key], key
    assert resumed["settings"]["best_epoch"] == full["settings"]["best_epoch"]


@pytest.mark.slow
def test_finetune_with_two_processes(ben, zero2, tmp_path):
    run = tmp_path / "ddp"
    proc = deepspeed(2, "launch/eval.py", DEBUG_LINEAR, *data_overrides(ben), f"eval.pretrained={zero2}",
                     f"run.dir={run}", *FAST_FINETUNE, "eval.batch_size=4", "eval.label_fraction=0.5",
                     "data.num_workers=1")
    assert "mAP macro" in proc.stdout
    doc = json.loads((run / "results.json").read_text())
    check_results(doc, run)
    assert doc["settings"]["world_size"] == 2 and doc["settings"]["batch_size"] == 8
    # the subset does not depend on the number of processes
    single = evaluate(eval_cfg(ben, tmp_path / "one", str(zero2), "eval.label_fraction=0.5", "eval.epochs=1"),
                      memory=MemoryCache())
    assert doc["settings"]["train_subset"] == single["settings"]["train_subset"]


@pytest.mark.slow
def test_pretrained_and_checkpoints_on_s3_without_credentials_in_outputs(ben, zero2, tmp_path, s3_bucket):
    from conftest import fresh_s3fs

    fs = fresh_s3fs()
    fs.put(str(zero2), f"{s3_bucket}/pretrain/ckpt", recursive=True)
    run = tmp_path / "s3"
    doc = evaluate(eval_cfg(ben, run, f"{s3_bucket}/pretrain/ckpt", *FAST_FINETUNE, "eval.epochs=1",
                            f"eval.checkpoint_dir={s3_bucket}/eval/ckpt"), memory=MemoryCache())
    check_results(doc, run)
    assert doc["settings"]["pretrained_info"]["zero_stage"] == 2
    assert fs.exists(f"{s3_bucket}/eval/ckpt/latest")
    secret = S3_ENV["AWS_SECRET_ACCESS_KEY"]
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
