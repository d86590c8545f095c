"""Bands matched by name: the network's bands from the manifest, and downstream bands onto an encoder's.

Manifests are real ones, written by the shard factory in the pipeline's format; band names are ESA's
(pipeline.sources.base: L1C B1..B12 with B8A and B10, L2A without B10).
"""

from __future__ import annotations

import pytest
import torch

from launch.config import ConfigError
from launch.data.fit import derive_bands
from launch.evaluation.bands import band_map, band_maps, canonical
from model import FusMAE, FusMAEConfig
from pipeline.manifest import load_manifest
from pipeline.sources.base import S2_L1C_BANDS, S2_L2A_BANDS
from shardfactory import make_shard_set

L1C, L2A = list(S2_L1C_BANDS), list(S2_L2A_BANDS)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    root = tmp_path_factory.mktemp("bands")
    return {name: load_manifest(make_shard_set(str(root / name), [2], hw=8, s2_bands=bands))
            for name, bands in (("l1c", L1C), ("l2a", L2A), ("rgbn", ["B2", "B3", "B4", "B8"]))}


def encoder(**kw) -> FusMAEConfig:
    return FusMAEConfig.preset("tiny", img_size=8, patch_size=4, **kw)


def test_a_13_band_encoder_on_12_bands_gets_b10_filled_with_its_mean(manifests):
    m = band_map(encoder(s2_bands=L1C), manifests["l2a"], "s2", "test encoder")
    x = torch.randn(3, 12, 8, 8)
    y = m.apply(x)
    assert y.shape == (3, 13, 8, 8)
    assert torch.count_nonzero(y[:, L1C.index("B10")]) == 0  # zero after normalisation: the band's mean
    for j, band in enumerate(L1C):
        if band != "B10":
            assert torch.equal(y[:, j], x[:, L2A.index(band)]), band  # B11 and B12 move up one place
    assert m.filled == ["B10"] and m.dropped == [] and not m.assumed
    assert "filled with their mean" in m.summary() and "B10" in m.summary()


def test_a_12_band_encoder_on_13_bands_drops_b10(manifests):
    m = band_map(encoder(s2_bands=L2A), manifests["l1c"], "s2", "test encoder")
    x = torch.randn(2, 13, 8, 8)
    y = m.apply(x)
    assert y.shape == (2, 12, 8, 8)
    assert torch.equal(y, torch.cat([x[:, :10], x[:, 11:]], dim=1))
    assert m.dropped == ["B10"] and m.filled == []
    assert m.describe() == {"encoder": L2A, "data": L1C, "filled_with_mean": [], "dropped": ["B10"],
                            "encoder_names_assumed": False}


def test_same_bands_pass_unchanged_and_unnamed_encoders_get_the_standard_list(manifests):
    same = band_map(encoder(s2_bands=L2A), manifests["l2a"], "s2", "e")
    x = torch.randn(1, 12, 8, 8)
    assert same.identity and same.apply(x) is x
    old = band_map(encoder(s2_channels=13), manifests["l2a"], "s2", "an older export")  # a count, no names
    assert old.assumed and old.encoder == tuple(L1C) and old.filled == ["B10"]
    assert "standard list" in old.summary()
    with pytest.raises(ConfigError, match=r"an older export: its 7 S2 input bands have no recorded names"):
        band_map(encoder(s2_channels=7), manifests["l2a"], "s2", "an older export")


def test_too_little_in_common_is_an_error_naming_both_band_lists(manifests):
    rgbn = band_map(encoder(s2_bands=["B2", "B3", "B4", "B8"]), manifests["l2a"], "s2", "e")  # all 4 present
    assert rgbn.filled == [] and len(rgbn.dropped) == 8
    with pytest.raises(ConfigError, match=r"an L1C encoder: its S2 bands \['B1', .* shards .* S2 bands "
                                          r"\['B2', 'B3', 'B4', 'B8'\] have 4 in common: too little"):
        band_map(encoder(s2_bands=L1C), manifests["rgbn"], "s2", "an L1C encoder")  # 4 of its 13
    with pytest.raises(ConfigError, match=r"the splits hold different S2 bands"):
        band_maps(encoder(s2_bands=L2A), {"train": manifests["l2a"], "test": manifests["l1c"]}, "e")


def test_band_names_are_matched_in_one_spelling():
    assert [canonical(b) for b in ("B01", "b8a", "B8A", " vv ", "B12", "B10")] == ["B1", "B8A", "B8A", "VV", "B12",
                                                                                  "B10"]


def test_the_network_takes_its_bands_from_the_manifest_and_refuses_a_contradiction(manifests):
    cfg = FusMAEConfig(size="tiny", img_size=8, patch_size=4)  # as a recipe leaves it: no band counts
    assert cfg.s2_channels is None
    with pytest.raises(ValueError, match=r"model\.s1_channels is not set"):
        FusMAE(cfg)
    derive_bands(cfg, manifests["l2a"], "model.*")
    assert (cfg.s1_channels, cfg.s2_channels) == (2, 12) and cfg.s2_bands == L2A and cfg.s1_bands == ["VV", "VH"]
    FusMAE(cfg)  # builds
    with pytest.raises(ConfigError, match=r"model\.s2_channels=13 \(from model\.\*\) but .* hold 12 S2 bands"):
        derive_bands(FusMAEConfig(size="tiny", s2_channels=13), manifests["l2a"], "model.*")
    with pytest.raises(ConfigError, match=r"model\.s2_bands=.*B10.* but .* hold"):
        derive_bands(FusMAEConfig(size="tiny", s2_bands=L1C[:12]), manifests["l2a"], "model.*")
    with pytest.raises(ValueError, match=r"model\.s2_channels: 12 contradicts model\.s2_bands"):
        FusMAEConfig(size="tiny", s2_channels=12, s2_bands=L1C)
