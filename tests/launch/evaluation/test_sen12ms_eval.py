"""SEN12MS scene classification end to end: the release's GeoTIFF tree (synthetic, published layout) sharded by
the real pipeline, evaluated single-label (accuracy, macro F1) and multi-label (mAP) with the simplified IGBP
classes, linear probe and fine-tune, from a 12-band L2A encoder on SEN12MS's 13 L1C bands.

SEN12MS ships train and test lists only (train_list.txt / test_list.txt); these tests give the test split as
the validation split too, which a study would replace by a held-out part of train.
"""

from __future__ import annotations

import json

import pytest

from conftest import bigearthnet_shards, run_module
from launch.config import ConfigError, load_eval_config
from launch.evaluation import MemoryCache, evaluate
from launch.training.export import export_encoder
from model import FusMAE, FusMAEConfig
from pipeline import synthetic
from pipeline.sources.base import S2_L2A_BANDS
from pipeline.sources.sen12ms import SIMPLIFIED_IGBP_CLASSES

from test_eval_end_to_end import DEBUG_LINEAR, FAST_FINETUNE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sen12ms(tmp_path_factory):
    root = tmp_path_factory.mktemp("sen12ms")
    synthetic.make_sen12ms(root / "archive", n_scenes=6, patches_per_scene=4, size=32, seed=2, test_scenes=2)
    run_module("pipeline.preprocess", "--no-progress", "--source", "sen12ms", "--input", str(root / "archive"),
               "--output", str(root / "shards"), "--split", "all", "--workers", "1")
    train, test = root / "shards" / "train" / "manifest.json", root / "shards" / "test" / "manifest.json"
    return {"train": str(train), "val": str(test), "test": str(test)}


@pytest.fixture(scope="module")
def l2a_encoder(tmp_path_factory):
    cfg = FusMAEConfig.preset("tiny", patch_size=8, img_size=32, s2_bands=list(S2_L2A_BANDS))
    out = tmp_path_factory.mktemp("l2a") / "encoder"
    export_encoder(FusMAE(cfg).encoder_state_dict(), cfg, {}, str(out))
    return str(out)


def cfg(sen12ms, run_dir, pretrained, *extra):
    return load_eval_config(DEBUG_LINEAR, [f"data.train_manifest={sen12ms['train']}",
                                           f"data.val_manifest={sen12ms['val']}", f"data.test_manifest={sen12ms['test']}",
                                           f"eval.pretrained={pretrained}", f"run.dir={run_dir}", "eval.epochs=4", *extra])


def test_single_label_linear_and_finetune(sen12ms, l2a_encoder, tmp_path):
    test_samples = json.loads(open(sen12ms["test"]).read())["totals"]["samples"]
    for protocol, extra in (("linear", []), ("finetune", [*FAST_FINETUNE, "eval.epochs=2"])):
        doc = evaluate(cfg(sen12ms, tmp_path / protocol, l2a_encoder, "eval.task=singlelabel", *extra),
                       memory=MemoryCache())
        s = doc["settings"]
        assert s["task"] == "singlelabel" and s["selected_by"] == "accuracy" and s["protocol"] == protocol
        assert 0.0 <= doc["accuracy"] <= 1.0 and doc["f1"] == doc["accuracy"]  # micro F1 of one label each
        assert list(doc["per_class_ap"]) == list(SIMPLIFIED_IGBP_CLASSES)
        assert doc["num_test_samples"] == test_samples
        assert s["val_score"] == next(h for h in doc["history"] if h["epoch"] == s["best_epoch"])["val_accuracy"]
        assert s["bands"]["s2"]["dropped"] == ["B10"] and s["bands"]["s2"]["filled_with_mean"] == []
        on_disk = json.loads((tmp_path / protocol / "results.json").read_text())
        assert on_disk["accuracy"] == doc["accuracy"]


def test_multi_label_protocol_and_what_single_label_needs(sen12ms, l2a_encoder, tmp_path, capsys):
    doc = evaluate(cfg(sen12ms, tmp_path / "multi", l2a_encoder), memory=MemoryCache())
    assert doc["settings"]["task"] == "multilabel" and doc["settings"]["selected_by"] == "map_macro"
    assert "accuracy" not in doc and 0.0 <= doc["map_macro"] <= 1.0
    assert list(doc["per_class_ap"]) == list(SIMPLIFIED_IGBP_CLASSES)
    assert "bands: S2: 13 data bands -> the encoder's 12; dropped (unknown to the encoder): B10" \
        in capsys.readouterr().out
    ben = bigearthnet_shards(tmp_path / "ben", n_patches=12, seed=1)  # BigEarthNet has no single class per patch
    with pytest.raises(ConfigError, match=r"no valid `label_index`.*eval\.task=singlelabel"):
        evaluate(load_eval_config(DEBUG_LINEAR, [f"data.train_manifest={ben / 'train' / 'manifest.json'}",
                                                 f"data.val_manifest={ben / 'validation' / 'manifest.json'}",
                                                 f"data.test_manifest={ben / 'test' / 'manifest.json'}",
                                                 f"eval.pretrained={l2a_encoder}", f"run.dir={tmp_path / 'ben-run'}",
                                                 "eval.task=singlelabel"]), memory=MemoryCache())
