"""Downstream evaluation, the fast parts: the schema and every shipped recipe, metrics against
scikit-learn, label subsets, layer-wise learning-rate decay, worker counts for small subsets."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from conftest import ROOT
from launch.config import ConfigError, EvalConfig, load_eval_config
from launch.evaluation.head import Classifier
from launch.evaluation.metrics import average_precision, multilabel_metrics, singlelabel_metrics
from launch.evaluation.optim import layer_decay_groups
from launch.evaluation.subset import choose_subset, keys_digest, select_subset, subset_size
from model import FusMAE, FusMAEConfig

DEBUG_LINEAR = str(ROOT / "configs" / "eval" / "debug_linear.yaml")
EVAL_RECIPES = sorted((ROOT / "configs" / "eval").glob("*.yaml"))


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
    assert cfg.model.s2_channels is None  # the baseline's bands come from the training manifest
    cfg.model.s1_channels, cfg.model.s2_channels = 2, 12  # as derive_bands sets them for BigEarthNet
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


def test_single_label_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(1)
    N, C = 200, 6
    true = rng.choice(C - 1, N, p=[0.4, 0.3, 0.2, 0.05, 0.05])  # class 5 never true
    logits = rng.normal(size=(N, C))
    logits[np.arange(N), true] += 1.0
    logits[:3, 5] += 10.0  # ... but predicted three times
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.eye(C, dtype=np.uint8)[true]
    m = singlelabel_metrics(y, probs, [f"c{i}" for i in range(C)])
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(true, pred)) == pytest.approx(m["f1"])
    assert m["f1_macro"] == pytest.approx(f1_score(true, pred, average="macro"))  # over true or predicted classes
    assert m["per_class_f1"]["c5"] == 0.0 and m["per_class_ap"]["c5"] is None
    with pytest.raises(ValueError, match="exactly one true class"):
        singlelabel_metrics(np.ones((2, 3)), np.ones((2, 3)) / 3)


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


def test_chosen_subset_keeps_keys_labels_and_positions_aligned():
    y = _labels()
    keys = [f"k{i:05d}" for i in range(len(y))]
    positions = [(f"train-{i % 3:06d}.tar", 1024 * i) for i in range(len(y))]
    sub = choose_subset(keys, y, positions, 0.1, seed=3)
    idx = select_subset(y, 0.1, seed=3)
    assert sub.keys == [keys[i] for i in idx] and len(sub) == len(idx)
    assert np.array_equal(sub.labels, y[idx])
    assert sub.positions == [positions[i] for i in idx]
    assert sub.digest == sub.description["keys_sha256"] == keys_digest(sub.keys)
    assert sub.description["size"] == len(idx) and sub.description["of"] == len(y)
    sel = sub.selection  # what the loaders read: per shard, the sorted byte offsets of the chosen samples
    assert sel.num_samples == len(idx)
    assert {(s, o) for s, offs in sel.offsets.items() for o in offs} == set(sub.positions)
    assert all(list(offs) == sorted(offs) for offs in sel.offsets.values())
