"""Downstream evaluation end to end: linear probing and fine-tuning from every kind of checkpoint.

The tests use a BigEarthNet-layout archive made by `pipeline.synthetic`, preprocessed by the real
pipeline, and pretraining checkpoints written by the real training script (`deepspeed`, 2 CPU ranks)
with ZeRO 0, 2 and 3.
"""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, S3_ENV, bigearthnet_shards, deepspeed, run_module, ssl4eo_shards
from launch.config import ConfigError, EvalConfig, load_eval_config
from launch.distributed import Runtime
from launch.evaluation import MemoryCache, evaluate
from launch.evaluation.data import EvalData
from launch.evaluation.pretrained import load_pretrained
from launch.evaluation.subset import keys_digest, select_subset
from model import FusMAE, FusMAEConfig
from pipeline.sources.bigearthnet import BIGEARTHNET_19_CLASSES

DEBUG_LINEAR = str(ROOT / "configs" / "eval" / "debug_linear.yaml")
FAST_FINETUNE = ["eval.protocol=finetune", "eval.epochs=2", "eval.batch_size=8", "eval.lr=1e-3"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ben(tmp_path_factory) -> dict[str, str]:
    """BigEarthNet-layout shards: 60 patches of 48 px, 20 per split, written by the real pipeline."""
    shards = bigearthnet_shards(tmp_path_factory.mktemp("ben"), n_patches=60, seed=5)
    return {"train": str(shards / "train" / "manifest.json"), "val": str(shards / "validation" / "manifest.json"),
            "test": str(shards / "test" / "manifest.json")}


TINY_VIT_B = ["model.size=tiny", "model.patch_size=8", "train.micro_batch_size=2", "train.grad_accum_steps=1",
              "train.warmup_steps=1", "train.bf16=false", "data.num_workers=1", "data.shuffle_buffer=8",
              "train.log_every=2"]
"""configs/vit_b.yaml shrunk to CPU size: every other setting (norm_pix_loss, base_lr, betas, ...) the recipe's."""


def _pretrain(tmp_path_factory, manifest: str, stage: int, recipe: str = "debug.yaml", *extra: str) -> Path:
    """A short pretraining run of ``recipe`` on ``manifest``'s shards; the bands come from the manifest."""
    run = tmp_path_factory.mktemp(f"pretrain_zero{stage}")
    deepspeed(2, "launch/train.py", "--config", str(ROOT / "configs" / recipe), f"data.manifest={manifest}",
              *extra, "data.image_size=32", "data.num_workers=1", "train.max_steps=4",
              "train.log_every=2", "checkpoint.every_steps=4", f"deepspeed.zero_stage={stage}",
              f"checkpoint.dir={run / 'ckpt'}", f"run.dir={run}")
    assert json.loads((run / "ckpt" / "latest").read_text())["tag"] == "step-00000004"
    assert (run / "ckpt" / "encoder" / "model.safetensors").exists()
    return run / "ckpt"


@pytest.fixture(scope="module")
def zero0(tmp_path_factory, ben) -> Path:
    return _pretrain(tmp_path_factory, ben["train"], 0)


@pytest.fixture(scope="module")
def zero2(tmp_path_factory, ben) -> Path:
    return _pretrain(tmp_path_factory, ben["train"], 2)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory) -> Path:
    """The ViT-B recipe (tiny) on SSL4EO-S12 L1C shards: a 13-band encoder, evaluated on 12-band BigEarthNet."""
    l1c = ssl4eo_shards(tmp_path_factory.mktemp("l1c"))
    return _pretrain(tmp_path_factory, str(l1c / "manifest.json"), 3, "vit_b.yaml", *TINY_VIT_B)


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


def shard_labels(manifest: str) -> dict[str, list[int]]:
    """key -> BigEarthNet-19 label vector of every sample of ``manifest``'s split, read straight from the tars'
    json members (not through the evaluation's readers)."""
    labels = {}
    for shard in sorted(Path(manifest).parent.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    labels[m.name.partition(".")[0]] = json.load(tar.extractfile(m))["label_vector"]
    return labels


def random_ranking_map(y: np.ndarray) -> float:
    """Macro mAP that a scorer ranking the samples at random gets on average: labels ``y`` (N, C) 0/1, the mean
    over the classes with a positive. For one class with P positives in N, AP = (1/P) sum over the positives of
    the precision at their rank; a positive sits at rank i with probability P/N, and then each of the i - 1
    samples above it is another positive with probability (P - 1)/(N - 1), so
    E[AP] = (1/N) sum_i (1 + (i - 1)(P - 1)/(N - 1)) / i = H_N/N + (P - 1)/(N - 1) (1 - H_N/N), H_N = sum_i 1/i.
    As N grows this tends to the prevalence P/N (which is exactly the AP of constant scores); on 20 samples it
    is ~0.05 above it, so it is the fairer chance level."""
    n = len(y)
    h = np.sum(1.0 / np.arange(1, n + 1))
    positives = y.sum(0)
    positives = positives[positives > 0]
    return float(np.mean(h / n + (positives - 1) / (n - 1) * (1 - h / n)))


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
                  "export": str(ckpt / "encoder")}[source]
    extra = FAST_FINETUNE if protocol == "finetune" else []
    doc = evaluate(eval_cfg(ben, tmp_path, pretrained, *extra), memory=MemoryCache())
    check_results(doc, tmp_path)
    s = doc["settings"]
    assert s["protocol"] == protocol
    assert s["pretrained_info"]["kind"] == ("export" if source == "export" else "zero-checkpoint")
    if source != "export":
        assert s["pretrained_info"]["zero_stage"] == int(source[-1])
        assert s["pretrained_info"]["tag"] == "step-00000004"
    assert s["model"]["img_size"] == 32
    if source == "zero3":  # 13 L1C bands pretrained, 12 L2A bands downstream: B10 filled with its mean
        assert s["model"]["s2_channels"] == 13 and s["model"]["s2_bands"][10] == "B10"
        assert s["bands"]["s2"]["filled_with_mean"] == ["B10"] and s["bands"]["s2"]["dropped"] == []
        assert s["model"]["norm_pix_loss"] is True  # the recipe's, not the model default
    else:
        assert s["model"]["s2_channels"] == 12 and s["bands"]["s2"]["filled_with_mean"] == []
    assert s["bands"]["s1"] == {"encoder": ["VV", "VH"], "data": ["VV", "VH"], "filled_with_mean": [],
                                "dropped": [], "encoder_names_assumed": False}
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
    out = capsys.readouterr().out
    assert out.count("cached in") == 3  # train, val, test from the shared folder
    assert "has a sample index" in out  # the labels come from the shard set's index.parquet, no metadata pass
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
    from_export = load_pretrained(eval_cfg(ben, tmp_path, str(zero3 / "encoder" / "model.safetensors")), data.manifests, rt)
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
def test_an_l1c_encoder_sees_bigearthnet_bands_in_its_own_order_with_b10_at_its_mean(ben, zero3, tmp_path, capsys):
    cfg = eval_cfg(ben, tmp_path, str(zero3))
    rt = Runtime()
    data = EvalData(cfg, rt)
    pretrained = load_pretrained(cfg, data.manifests, rt)
    assert "bands: S2: 12 data bands -> the encoder's 13; filled with their mean (0 after normalisation): B10" \
        in capsys.readouterr().out
    batch = next(iter(data.pass_loader("test")))
    plain_s1, plain_s2 = data.images(batch)  # no map yet: the shards' 12 bands, normalised
    data.bands = pretrained.bands
    s1, s2 = data.images(batch)
    l1c, l2a = pretrained.cfg.s2_bands, data.manifests["test"].bands("s2")
    assert s2.shape[1] == 13 == len(l1c) and plain_s2.shape[1] == 12 == len(l2a) and "B10" not in l2a
    assert torch.count_nonzero(s2[:, l1c.index("B10")]) == 0
    for j, band in enumerate(l1c):
        if band != "B10":
            torch.testing.assert_close(s2[:, j], plain_s2[:, l2a.index(band)], rtol=0, atol=0)
    torch.testing.assert_close(s1, plain_s1, rtol=0, atol=0)
    features = pretrained.net.encode(s1, s2)  # what the probe sees: the 13-band encoder runs on them
    assert features.shape == (s2.shape[0], pretrained.cfg.embed_dim) and torch.isfinite(features).all()


@pytest.mark.slow
def test_eval_pool_overrides_the_checkpoints_pooled_feature(ben, zero2, tmp_path):
    mean = evaluate(eval_cfg(ben, tmp_path / "mean", str(zero2), "eval.pool=mean"), memory=MemoryCache())
    cls = evaluate(eval_cfg(ben, tmp_path / "cls", str(zero2), "eval.pool=cls"), memory=MemoryCache())
    assert mean["settings"]["pool"] == "mean" and mean["settings"]["model"]["pool"] == "mean"
    assert cls["settings"]["pool"] == "cls" and cls["settings"]["model"]["pool"] == "cls"
    assert mean["per_class_ap"] != cls["per_class_ap"]  # another feature, another probe
    default = evaluate(eval_cfg(ben, tmp_path / "ckpt", str(zero2)), memory=MemoryCache())
    assert default["settings"]["pool"] == "mean"  # configs/debug.yaml pretrains with the model default


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["xattn", "concat", "stack", "s1", "s2"])
def test_random_init_baseline_for_every_fusion(ben, tmp_path, fusion):
    lin = evaluate(eval_cfg(ben, tmp_path / "linear", "none", f"model.fusion={fusion}", "eval.epochs=5"),
                   memory=MemoryCache())
    check_results(lin, tmp_path / "linear")
    assert lin["settings"]["pretrained_info"]["kind"] == "none" and lin["settings"]["model"]["fusion"] == fusion
    assert lin["settings"]["model"]["s2_bands"] == json.loads(Path(ben["train"]).read_text())["modalities"]["s2"]["bands"]
    ft = evaluate(eval_cfg(ben, tmp_path / "ft", "none", f"model.fusion={fusion}", *FAST_FINETUNE, "eval.epochs=1",
                           "data.augment=false"), memory=MemoryCache())
    check_results(ft, tmp_path / "ft")


@pytest.mark.slow
def test_linear_probe_on_a_random_init_encoder_beats_chance(ben, tmp_path):
    """The labels are read off the land cover the S1/S2 pixels are rendered from, so even a random-init encoder's
    pooled features let a linear probe rank the test patches far better than chance; a probe that learns nothing
    (shuffled training labels, constant or random scores) does not."""
    y = np.array(list(shard_labels(ben["test"]).values()))  # (20, 19): the test split as the shards hold it
    prevalence = float(y.mean(0)[y.any(0)].mean())
    chance = random_ranking_map(y)
    # module fixture (seed 5): 6 classes present, prevalence 0.642, chance 0.691; over 3000 random scorings
    # (sklearn's average_precision_score) the macro mAP is 0.690 +- 0.037, 99.9th percentile 0.80.
    assert 0.5 < prevalence < chance < 0.75
    doc = evaluate(eval_cfg(ben, tmp_path, "none"), memory=MemoryCache())
    assert doc["num_test_samples"] == len(y) and doc["test_classes_present"] == int(y.any(0).sum())
    # measured 0.853 (eval.seed 0-7: 0.82-0.85; the other fusions 0.84-0.88). A head that learns nothing gets
    # 0.61-0.70 (eval.lr=1e-12), 0.65-0.75 (shuffled training labels), 0.642 (constant scores). The margin, 0.1,
    # is ~2.7 standard deviations of a random scorer; it is sized for this fixture's 20 test patches.
    assert doc["map_macro"] > chance + 0.1, (doc["map_macro"], chance)


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
    from launch.training.export import export_encoder

    odd = FusMAEConfig.preset("tiny", patch_size=8, s2_channels=5, img_size=32)  # 5 unnamed bands: no standard list
    export_encoder(FusMAE(odd).encoder_state_dict(), odd, {}, str(tmp_path / "odd"))
    with pytest.raises(ConfigError, match=r"5 S2 input bands have no recorded names"):
        evaluate(eval_cfg(ben, tmp_path / "run", str(tmp_path / "odd" / "encoder.safetensors")), memory=MemoryCache())
    rgbn = FusMAEConfig.preset("tiny", patch_size=8, s2_bands=["R", "G", "B", "NIR"], img_size=32)
    export_encoder(FusMAE(rgbn).encoder_state_dict(), rgbn, {}, str(tmp_path / "rgbn"))
    with pytest.raises(ConfigError, match=r"\['R', 'G', 'B', 'NIR'\].*have 0 in common: too little"):
        evaluate(eval_cfg(ben, tmp_path / "run", str(tmp_path / "rgbn")), memory=MemoryCache())
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
    proc = deepspeed(2, "launch/eval.py", "--config", DEBUG_LINEAR, *data_overrides(ben), f"eval.pretrained={zero2}",
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


# ----------------------------------------------------------------------------- the subset is read by key


def _subset_keys(train_manifest: str, fraction: float, seed: int) -> set[str]:
    """The keys `select_subset` picks from the training labels sorted by key, read here straight from the tar."""
    labels = shard_labels(train_manifest)
    keys = sorted(labels)
    idx = select_subset(np.array([labels[k] for k in keys], dtype=np.uint8), fraction, seed)
    return {keys[i] for i in idx}


def _corrupt_images_outside(train_manifest: str, keep: set[str]) -> int:
    """Overwrite the s1/s2 .npy bytes of every sample not in ``keep`` with garbage of the same size (headers
    and json members intact, so a metadata pass still works); returns the samples corrupted."""
    corrupted = set()
    for shard in Path(train_manifest).parent.glob("*.tar"):
        with tarfile.open(shard) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(".npy") and m.name.partition(".")[0] not in keep]
        with open(shard, "r+b") as f:
            for m in members:
                f.seek(m.offset_data)
                f.write(b"\xff" * m.size)
                corrupted.add(m.name.partition(".")[0])
    return len(corrupted)


@pytest.mark.slow
@pytest.mark.parametrize("protocol,sample_index", [("linear", True), ("finetune", True), ("linear", False)])
def test_only_the_selected_training_samples_are_read(ben, tmp_path, caplog, capsys, protocol, sample_index):
    """The training split's image bytes outside the label subset are garbage: a whole-split read would
    skip the shard (losing samples, changing the results, warning); a read by key does not notice.
    Without the shard set's sample index (sets written before it existed) the labels and positions come
    from a metadata pass over the tar headers and json members instead."""
    from launch.data.loader import LoaderSettings, PassLoader
    from pipeline.manifest import load_manifest

    fraction, seed = 0.25, 0
    keep = _subset_keys(ben["train"], fraction, seed)
    assert len(keep) == 5
    copy = tmp_path / "train"
    shutil.copytree(Path(ben["train"]).parent, copy)
    assert _corrupt_images_outside(str(copy / "manifest.json"), keep) == 15
    if not sample_index:
        body = json.loads((copy / "manifest.json").read_text())
        assert body.pop("index")["name"] == "index.parquet"
        (copy / "index.parquet").unlink()
        (copy / "manifest.json").write_text(json.dumps(body))
    whole = PassLoader(load_manifest(str(copy / "manifest.json")), LoaderSettings(num_workers=0), batch_size=4)
    with caplog.at_level(logging.WARNING):
        read = sum(len(b["keys"]) for b in whole)
    assert read < 20  # the corruption is real: a whole pass loses samples, with a warning
    assert any("skipping shard" in r.getMessage() for r in caplog.records)

    args = ["eval.pretrained=none", f"eval.label_fraction={fraction}", f"eval.seed={seed}", "eval.epochs=3",
            "eval.cache_features=false", "data.num_workers=0"]
    if protocol == "finetune":
        args += [*FAST_FINETUNE, "eval.epochs=1", "eval.checkpoint_every=0"]
    clean = evaluate(load_eval_config(DEBUG_LINEAR, [*data_overrides(ben), f"run.dir={tmp_path / 'clean'}", *args]),
                     memory=MemoryCache())
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        dirty = evaluate(load_eval_config(DEBUG_LINEAR, [*data_overrides({**ben, "train": str(copy / "manifest.json")}),
                                                         f"run.dir={tmp_path / 'dirty'}", *args]), memory=MemoryCache())
    assert not [r for r in caplog.records if "skipping shard" in r.getMessage()]
    assert ("has a sample index" in capsys.readouterr().out) == sample_index
    assert dirty["settings"]["train_subset"]["keys_sha256"] == keys_digest(sorted(keep))
    assert dirty["history"] == clean["history"]
    for key in ("map_macro", "map_micro", "f1", "f1_macro", "per_class_ap"):
        assert dirty[key] == clean[key], key


@pytest.mark.slow
def test_small_subsets_read_with_fewer_workers(ben, tmp_path, caplog):
    """A subset smaller than processes x workers reads with fewer workers; fewer samples than processes fail."""
    with caplog.at_level(logging.WARNING):
        doc = evaluate(eval_cfg(ben, tmp_path / "one", "none", "eval.label_fraction=0.05", "data.num_workers=2",
                                *FAST_FINETUNE, "eval.epochs=1", "eval.checkpoint_every=0"), memory=MemoryCache())
    assert doc["settings"]["train_subset"]["size"] == 1
    assert any("reading with 1 worker(s) per process" in r.getMessage() for r in caplog.records)
    # two processes (the check runs before any collective, so one process can stand for rank 0 of two)
    cfg = eval_cfg(ben, tmp_path / "two", "none", "eval.label_fraction=0.05", "data.num_workers=2")
    from launch.evaluation.data import SplitCache
    from launch.evaluation.subset import choose_subset

    data = EvalData(cfg, Runtime(rank=0, world_size=2))
    index = EvalData(cfg, Runtime()).train_index(SplitCache(cfg, Runtime(), MemoryCache()))
    subset = choose_subset(index.keys, index.labels, index.positions, 0.05, 0)
    with pytest.raises(ConfigError, match=r"eval\.label_fraction=0\.05 selects 1 training sample.*2 processes"):
        data.train_stream(subset, batch_size=4, seed=0)


@pytest.mark.slow
def test_seeds_aggregate_into_one_table_per_checkpoint(ben, zero2, tmp_path):
    sweep, shared = tmp_path / "sweep", tmp_path / "features"
    docs = {}
    for seed in (0, 1, 2):
        run = sweep / f"zero2-seed{seed}"
        docs[seed] = evaluate(eval_cfg(ben, run, str(zero2), "eval.label_fraction=0.5", f"eval.seed={seed}",
                                       f"eval.feature_cache_dir={shared}"), memory=MemoryCache())
    base = evaluate(eval_cfg(ben, sweep / "random-seed0", "none", "eval.label_fraction=0.5"), memory=MemoryCache())
    proc = run_module("launch.evaluation.aggregate", str(sweep), "--out", str(tmp_path / "summary"))
    assert "4 run(s) in 2 row(s)" in proc.stdout
    rows = json.loads((tmp_path / "summary" / "summary.json").read_text())["rows"]
    pre = next(r for r in rows if r["pretrained"] != "none")
    assert pre["seeds"] == [0, 1, 2] and pre["protocol"] == "linear" and pre["label_fraction"] == 0.5
    for metric in ("map_macro", "map_micro", "f1_macro", "f1"):
        values = [docs[s][metric] for s in (0, 1, 2)]
        assert pre[metric]["values"] == values
        assert pre[metric]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert pre[metric]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    rand = next(r for r in rows if r["pretrained"] == "none")
    assert rand["seeds"] == [0] and rand["map_macro"] == {"mean": base["map_macro"], "std": None,
                                                          "values": [base["map_macro"]]}
    md = (tmp_path / "summary" / "results.md").read_text()
    mean, std = pre["map_macro"]["mean"], pre["map_macro"]["std"]
    assert f"| linear | 50% | mean | 3 | {mean:.4f} ± {std:.4f} |" in md and "## none" in md
    # the same seed twice for one evaluation is refused, and nothing is written
    shutil.copytree(sweep / "zero2-seed1", tmp_path / "again" / "zero2-seed1")
    proc = run_module("launch.evaluation.aggregate", str(sweep), str(tmp_path / "again"), "--out",
                      str(tmp_path / "summary2"), check=False)
    assert proc.returncode == 2 and "seed 1 appears twice" in proc.stderr
    assert not (tmp_path / "summary2").exists()
