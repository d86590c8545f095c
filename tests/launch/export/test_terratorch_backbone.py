"""The exported encoder inside TerraTorch: registered backbones, the model factory, and the shipped recipe
run end to end (a few training steps of `terratorch fit` on tiny BigEarthNet shards).

Needs the optional extra (``pip install -e .[terratorch]``). The default install, and so ``make test``, has
no terratorch: these tests are skipped there (TerraTorch needs torchvision, whose PyPI wheels are CUDA
builds that do not load beside the CPU torch of the default install). ``make test-terratorch`` (run by CI
after ``make test``) builds an environment with a matching torch + torchvision pair and runs them there,
where a missing terratorch is a failure.
"""

from __future__ import annotations

import csv
import math
import os

import pytest
import torch
import yaml

if os.environ.get("FUSMAE_REQUIRE_TERRATORCH"):  # `make test-terratorch` (CI): a broken install fails, never skips
    import terratorch  # noqa: F401
else:
    pytest.importorskip("terratorch", reason="terratorch is an optional extra (pip install -e .[terratorch], "
                                             "`make test-terratorch`); the default install has no terratorch")

from conftest import ROOT, bigearthnet_shards, run_module  # noqa: E402
from launch.terratorch import BACKBONES  # noqa: E402
from launch.training import export  # noqa: E402
from model import FusMAE, FusMAEConfig, FusMAEEncoder  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402

RECIPE = ROOT / "configs" / "terratorch" / "bigearthnet_multilabel.yaml"


@pytest.fixture(scope="module")
def ben(tmp_path_factory) -> dict[str, str]:
    """BigEarthNet-layout shards by the real pipeline: 30 patches of 48 px, about 10 per split."""
    shards = bigearthnet_shards(tmp_path_factory.mktemp("ben_tt"), n_patches=30, seed=3)
    return {s: str(shards / s / "manifest.json") for s in ("train", "validation", "test")}


@pytest.fixture(scope="module")
def exported(ben, tmp_path_factory) -> str:
    """A tiny encoder exported with the training shards' bands and statistics."""
    cfg = FusMAEConfig.preset("tiny", img_size=32, patch_size=8, s2_channels=12)
    torch.manual_seed(0)
    dest = str(tmp_path_factory.mktemp("tt_export") / "encoder")
    export.export_pretrained(FusMAE(cfg).encoder_state_dict(),
                             export.hub_config(cfg, load_manifest(ben["train"]), 32, step=4), dest)
    return dest


def test_backbones_are_registered_and_follow_terratorchs_contract(exported):
    import launch.terratorch.backbone  # noqa: F401
    from terratorch.registry import BACKBONE_REGISTRY

    assert all(name in BACKBONE_REGISTRY for name in BACKBONES)
    backbone = BACKBONE_REGISTRY.build("fusmae", pretrained=exported)
    encoder = FusMAEEncoder.from_pretrained(exported)
    assert backbone.out_channels == [64, 64, 64]  # one per block, the width of each map
    s1, s2 = torch.randn(2, 2, 32, 32) * 4 - 15, torch.rand(2, 12, 32, 32) * 3000
    with torch.no_grad():
        maps = backbone({"s1": s1, "S2L2A": s2})  # TerraMind's modality names work too
        want = encoder(s1, s2, return_maps=True).maps
    assert len(maps) == 3 and all(torch.equal(a, b) for a, b in zip(maps, want))
    assert all(m.shape == (2, 64, 4, 4) for m in maps)
    picked = BACKBONE_REGISTRY.build("fusmae_tiny", pretrained=True, ckpt_path=exported, out_indices=[-1])
    assert picked.out_channels == [64] and torch.equal(picked(s1=s1, s2=s2)[0], want[-1])
    with pytest.raises(ValueError, match="holds a tiny encoder"):
        BACKBONE_REGISTRY.build("fusmae_vit_b", pretrained=exported)
    with pytest.raises(ValueError, match="unknown input modalities"):
        backbone({"optical": s2})


def test_model_factory_builds_classification_and_segmentation_models(exported):
    from terratorch.models import EncoderDecoderFactory

    factory = EncoderDecoderFactory()
    x = {"s1": torch.randn(2, 2, 30, 30), "s2": torch.rand(2, 12, 30, 30) * 3000}  # padded to 32 by TerraTorch
    cls = factory.build_model("classification", backbone="fusmae", backbone_pretrained=exported,
                              decoder="IdentityDecoder", num_classes=19)
    seg = factory.build_model("segmentation", backbone="fusmae", backbone_pretrained=exported,
                              decoder="FCNDecoder", num_classes=5)
    with torch.no_grad():
        assert cls(x).output.shape == (2, 19)
        assert seg(x).output.shape == (2, 5, 30, 30)


@pytest.mark.slow
def test_shipped_recipe_fine_tunes_through_terratorchs_task_and_trainer(ben, exported, tmp_path):
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["trainer"].update(accelerator="cpu", devices=1, precision="32-true", max_epochs=1, max_steps=3,
                             limit_val_batches=2, log_every_n_steps=1, default_root_dir=str(tmp_path / "runs"),
                             logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": str(tmp_path / "logs")}})
    recipe["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    recipe["data"]["init_args"].update(train_manifest=ben["train"], val_manifest=ben["validation"],
                                       test_manifest=ben["test"], batch_size=4, num_workers=0, shuffle_buffer=8)
    recipe["model"]["init_args"]["model_args"]["backbone_pretrained"] = exported
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    proc = run_module("terratorch", "fit", "--config", str(config), timeout=600)
    (metrics,) = (tmp_path / "logs").rglob("metrics.csv")
    losses = [float(r["train/loss"]) for r in csv.DictReader(metrics.open()) if r.get("train/loss")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list((tmp_path / "ckpt").glob("*.ckpt"))
    # the fine-tuned task's checkpoint holds the backbone under model.encoder.encoder.*
    state = torch.load(next((tmp_path / "ckpt").glob("last*.ckpt")), map_location="cpu", weights_only=False)
    assert any(k.startswith("model.encoder.encoder.blocks.") for k in state["state_dict"])
