"""MAE's learning-rate rule (lr = base_lr x global batch / 256) and what the pretraining recipes set."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from launch.config import ConfigError, load_config
from launch.config.pretrain import TrainConfig

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("micro, accum, world", [(64, 4, 16), (64, 4, 1), (32, 1, 8), (8, 2, 3)])
def test_the_peak_rate_scales_with_the_global_batch(micro, accum, world):
    t = TrainConfig(micro_batch_size=micro, grad_accum_steps=accum, base_lr=1.5e-4)
    assert t.global_batch(world) == micro * accum * world
    assert t.peak_lr(world) == pytest.approx(1.5e-4 * micro * accum * world / 256, rel=1e-12)
    assert f"x global batch {micro * accum * world} ({micro} x {accum} accumulation x {world} ranks)" in t.describe_lr(world)


def test_an_absolute_rate_is_not_scaled_and_the_default_is_maes_base_rate():
    assert TrainConfig(micro_batch_size=64, lr=1e-3).peak_lr(16) == 1e-3
    assert TrainConfig(micro_batch_size=64, lr=1e-3).describe_lr(16) == "lr 0.001 (absolute: train.lr)"
    default = TrainConfig(micro_batch_size=256)
    assert default.base_lr == 1.5e-4 and default.peak_lr(1) == pytest.approx(1.5e-4)  # 256 samples: base_lr


def test_both_rates_or_a_floor_above_the_peak_are_refused():
    with pytest.raises(ValueError, match=r"train\.lr=0\.001 and train\.base_lr=0\.00015: give one.*base_lr=null"):
        TrainConfig(lr=1e-3, base_lr=1.5e-4)
    with pytest.raises(ValueError, match=r"min_lr=0\.01 is above the peak learning rate"):
        TrainConfig(micro_batch_size=8, base_lr=1e-3, min_lr=1e-2).peak_lr(1)
    with pytest.raises(ConfigError, match=r"train\.lr=0\.01 and train\.base_lr"):  # over a recipe's base_lr
        load_config(str(ROOT / "configs" / "vit_b.yaml"), ["data.manifest=x", "train.lr=0.01"])
    cfg = load_config(str(ROOT / "configs" / "vit_b.yaml"), ["data.manifest=x", "train.lr=0.01", "train.base_lr=null"])
    assert cfg.train.peak_lr(16) == 0.01


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_pretraining_recipe_loads_with_a_base_rate_and_bands_from_the_manifest(recipe: Path):
    cfg = load_config(str(recipe), ["data.manifest=x"])
    assert cfg.train.base_lr is not None and cfg.train.lr is None, "recipes give MAE's base rate"
    assert cfg.model.s1_channels is None and cfg.model.s2_channels is None, "recipes leave the bands to the manifest"
    assert cfg.model.mask_ratio == 0.75 and list(cfg.train.betas) == [0.9, 0.95] and cfg.train.weight_decay == 0.05
    assert cfg.train.warmup_steps > 0 and cfg.train.warmup_steps < cfg.train.max_steps
    assert "norm_pix_loss" in recipe.read_text() or recipe.name == "debug.yaml", "the choice is stated"


def test_the_vit_recipes_reach_maes_rate_at_their_stated_global_batch():
    for name, world, batch, lr in (("vit_b.yaml", 16, 4096, 2.4e-3), ("vit_s.yaml", 16, 2048, 1.2e-3),
                                   ("vit_b_terramesh.yaml", 16, 4096, 2.4e-3)):
        t = load_config(str(ROOT / "configs" / name), ["data.manifest=x"]).train
        assert t.global_batch(world) == batch and t.peak_lr(world) == pytest.approx(lr), name
        assert f"global batch of {batch}" in (ROOT / "configs" / name).read_text() or \
            f"= {batch}" in (ROOT / "configs" / name).read_text(), name
