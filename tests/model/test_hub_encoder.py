"""`FusMAEEncoder`: the Hub-format encoder, its inputs (raw or normalised), its per-layer maps, its card.

Everything loads from local folders; nothing here touches the network.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from launch.data.augment import DeviceAugment
from model import FusMAE, FusMAEConfig, FusMAEEncoder
from model.card import render_card
from model.config import FUSIONS
from model.hub import FORMAT, FORMAT_VERSION, Normalize

S1_BANDS = ["VV", "VH"]
S2_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"]
STATS = {"s1": {"mean": [-12.5, -19.0], "std": [3.1, 3.9]},
         "s2": {"mean": [1000.0 + 100 * i for i in range(12)], "std": [400.0 + 10 * i for i in range(12)]}}
NODATA = {"s1": "non-finite", "s2": 0}


def config(**model) -> dict:
    cfg = FusMAEConfig.preset("tiny", img_size=32, patch_size=8, s2_channels=12, **model)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": cfg.to_dict(),
            "data": {"s1_bands": S1_BANDS, "s2_bands": S2_BANDS, "normalization": STATS, "nodata": NODATA,
                     "units": {"s1": "backscatter dB", "s2": "reflectance x 10000"}, "image_size": 32,
                     "shards": {"manifest": "s3://bucket/ssl4eo/train/manifest.json", "fingerprint": "ab" * 32,
                                "split": "train", "samples": 1024, "source": {"name": "ssl4eo-zarr"}}},
            "training": {"step": 40, "checkpoint": "s3://bucket/runs/x", "tag": "step-00000040"},
            "evaluation": []}


def encoder(seed: int = 0, **model) -> FusMAEEncoder:
    torch.manual_seed(seed)
    return FusMAEEncoder(config(**model)).eval()


def raw_images(B: int = 2, H: int = 32, W: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """S1 in dB (float32, a few NaN), S2 reflectance x 10000 (int16, a few no-data zeros)."""
    g = torch.Generator().manual_seed(seed)
    s1 = torch.randn(B, 2, H, W, generator=g) * 4 - 15
    s1[0, 1, 3, 4] = float("nan")
    s2 = torch.randint(1, 6000, (B, 12, H, W), generator=g).to(torch.int16)
    s2[1, :, 5:7, 8] = 0
    return s1, s2


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_pooled_features_are_the_networks_and_maps_have_the_grid_shape(fusion, pool):
    enc = encoder(fusion=fusion, pool=pool)
    net = FusMAE(enc.cfg).eval()
    net.load_encoder_state_dict(enc.encoder_state_dict())
    s1, s2 = torch.randn(3, 2, 32, 40), torch.randn(3, 12, 32, 40)
    with torch.no_grad():
        out = enc(s1, s2, normalized=True, return_maps=True)
        assert torch.equal(out.pooled, net.encode(s1, s2))  # the same ops in the same order: bit-identical
        assert enc(s1, s2, normalized=True).maps is None
    D = enc.cfg.embed_dim
    assert out.pooled.shape == (3, D)
    assert len(out.maps) == enc.num_layers == enc.cfg.depth
    assert all(m.shape == (3, D, 4, 5) for m in out.maps)  # (B, D, H/8, W/8)
    if pool == "mean":  # the last map is the normed tokens the pooled vector averages (over streams, then grid)
        torch.testing.assert_close(out.maps[-1].mean(dim=(2, 3)), out.pooled, rtol=1e-5, atol=1e-6)


def test_raw_and_normalised_inputs_agree_with_pretraining_normalisation():
    s1, s2 = raw_images()
    augment = DeviceAugment(STATS, NODATA, image_size=32)
    n1, _ = augment.normalise(s1, augment.s1_mean, augment.s1_inv_std, augment.s1_nodata)
    n2, _ = augment.normalise(s2, augment.s2_mean, augment.s2_inv_std, augment.s2_nodata)
    enc = encoder()
    m1, m2 = enc.normalize(s1, s2)
    assert torch.equal(m1, n1) and torch.equal(m2, n2)  # the very transform pretraining applied
    assert torch.isfinite(m1).all() and m1[0, 1, 3, 4] == 0 and (m2[1, :, 5:7, 8] == 0).all()
    with torch.no_grad():
        raw = enc(s1, s2, return_maps=True)
        norm = enc(n1, n2, normalized=True, return_maps=True)
    assert torch.equal(raw.pooled, norm.pooled)
    assert all(torch.equal(a, b) for a, b in zip(raw.maps, norm.maps))


def test_normalize_floors_a_constant_band_and_checks_channels():
    norm = Normalize([5.0, 1.0], [0.0, 2.0], nodata=None)
    x = torch.full((1, 2, 2, 2), 5.0)
    assert torch.equal(norm(x)[0, 0], torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        norm(torch.zeros(1, 3, 2, 2))


def test_save_and_from_pretrained_round_trip_from_a_local_folder(tmp_path):
    enc = encoder(seed=3)
    enc.save_pretrained(tmp_path / "enc")
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "enc" / "config.json").read_text()) == config()
    weights = load_file(str(tmp_path / "enc" / "model.safetensors"))
    assert sorted(weights) == sorted(FusMAE(enc.cfg).encoder_state_dict())  # the encoder's names, nothing else
    back = FusMAEEncoder.from_pretrained(str(tmp_path / "enc"))
    assert not back.training
    s1, s2 = raw_images(seed=1)
    with torch.no_grad():
        assert torch.equal(back(s1, s2).pooled, enc(s1, s2).pooled)
    card = (tmp_path / "enc" / "README.md").read_text()
    assert card == render_card(config())  # save_pretrained / push_to_hub write the export's card


def test_from_pretrained_is_strict_and_explains_a_folder_that_is_not_one(tmp_path):
    enc = encoder()
    enc.save_pretrained(tmp_path / "enc")
    weights = load_file(str(tmp_path / "enc" / "model.safetensors"))
    del weights["norm.weight"]
    save_file(weights, str(tmp_path / "enc" / "model.safetensors"))
    with pytest.raises(RuntimeError, match="missing.*norm.weight"):
        FusMAEEncoder.from_pretrained(str(tmp_path / "enc"))
    (tmp_path / "old").mkdir()
    save_file(enc.encoder_state_dict(), str(tmp_path / "old" / "model.safetensors"))
    with pytest.raises(ValueError, match="no config.json.*launch.export"):
        FusMAEEncoder.from_pretrained(str(tmp_path / "old"))
    with pytest.raises(ValueError, match="not a Fus-MAE encoder config"):
        FusMAEEncoder({"model": {}})


def test_raw_inputs_need_statistics():
    cfg = config()
    del cfg["data"]
    enc = FusMAEEncoder(cfg)
    s1, s2 = torch.randn(1, 2, 16, 16), torch.randn(1, 12, 16, 16)
    assert enc(s1, s2, normalized=True).pooled.shape == (1, 64)
    with pytest.raises(ValueError, match="no normalisation statistics for s1"):
        enc(s1, s2)


def test_single_modality_encoder_takes_only_its_modality():
    enc = encoder(fusion="s2")
    _, s2 = raw_images()
    with torch.no_grad():
        out = enc(None, s2, return_maps=True)
    assert out.pooled.shape == (2, 64) and out.maps[0].shape == (2, 64, 4, 5)


def test_model_card_names_bands_order_normalisation_and_results():
    cfg = config()
    card = render_card(cfg)
    assert card.startswith("---\nlibrary_name: fusmae\n")
    for i, band in enumerate(S2_BANDS):
        assert f"| {i} | {band} | {STATS['s2']['mean'][i]:.4g} | {STATS['s2']['std'][i]:.4g} |" in card
    assert "| 0 | VV | -12.5 | 3.1 |" in card and "| 1 | VH | -19 | 3.9 |" in card
    assert "(x - mean) / max(std, 1e-6)" in card and "no-data: 0" in card and "reflectance x 10000" in card
    assert cfg["data"]["shards"]["fingerprint"] in card and "| pretraining step | 40 |" in card
    assert "FusMAEEncoder.from_pretrained" in card and "wds.WebDataset" in card and "fusmae_tiny" in card
    assert "No evaluation results" in card
    cfg["evaluation"] = [{"protocol": "linear", "label_fraction": 0.1, "test_manifest": "s3://b/ben/test",
                          "num_test_samples": 20, "map_macro": 0.61234, "map_micro": 0.7, "f1": 0.5, "f1_macro": 0.4}]
    card = render_card(cfg)
    assert "| linear | 0.1 | `s3://b/ben/test` | 20 | 0.6123 | 0.7 | 0.5 | 0.4 |" in card
