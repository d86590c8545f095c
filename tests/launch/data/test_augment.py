"""Augmentation: crop boxes drawn in the workers, normalisation and geometry on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from launch.data.augment import DeviceAugment, draw_crops
from launch.data.loader import LoaderSettings, ShardLoader
from pipeline.manifest import load_manifest
from shardfactory import make_shard_set


def test_crop_boxes_follow_scale_and_ratio():
    crop, flip = draw_crops(np.random.default_rng(0), 4000, 0.35, True, False, (16, 16))
    area, ratio = crop[:, 2] * crop[:, 3], crop[:, 3] / crop[:, 2]
    assert area.min() >= 0.35 - 1e-6 and area.max() <= 1 + 1e-6
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    assert 0.4 < flip[:, 0].mean() < 0.6 and not flip[:, 1].any()


def plain_manifest(c2: int, s2_nodata=0, mean=None, std=None) -> dict:
    rng = np.random.default_rng(0)
    return {
        "stats": {"s1": {"mean": [-12.0, -18.0], "std": [4.0, 3.0]},
                  "s2": {"mean": mean or rng.uniform(500, 2000, c2).tolist(),
                         "std": std or rng.uniform(100, 900, c2).tolist()}},
        "nodata": {"s1": "non-finite", "s2": s2_nodata},
    }


def augment(m: dict, size: int) -> DeviceAugment:
    return DeviceAugment(m["stats"], m["nodata"], size)


def raw_batch(b=3, c2=4, hw=12, seed=0, full=True) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {"s1": (torch.randn(b, 2, hw, hw, generator=g) * 5 - 14),
             "s2": torch.randint(1, 4000, (b, c2, hw, hw), generator=g, dtype=torch.int16)}
    if full:
        batch["crop"] = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(b, 1)
        batch["flip"] = torch.zeros(b, 2, dtype=torch.bool)
    return batch


def test_augment_normalises_like_numpy():
    m = plain_manifest(4)
    batch = raw_batch()
    s1, s2, bad = augment(m, 12)(batch, "cpu")
    for name, out in (("s1", s1), ("s2", s2)):
        mean = np.array(m["stats"][name]["mean"])[None, :, None, None]
        std = np.array(m["stats"][name]["std"])[None, :, None, None]
        want = (batch[name].numpy().astype(np.float64) - mean) / std
        assert out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4)
    assert bad.ndim == 0 and bad.item() == 0


def test_augment_replaces_nonfinite_and_nodata():
    batch = raw_batch()
    batch["s1"][0, 0, 1, 2] = float("nan")
    batch["s1"][1, 1, 3, 3] = float("inf")
    batch["s1"][2, 0, 0, 0] = -float("inf")
    batch["s2"][1, 2, 5, 5] = 0  # no-data
    s1, s2, bad = augment(plain_manifest(4), 12)(batch, "cpu")
    assert isinstance(bad, torch.Tensor) and bad.ndim == 0 and int(bad) == 3
    holes = torch.stack([s1[0, 0, 1, 2], s1[1, 1, 3, 3], s1[2, 0, 0, 0], s2[1, 2, 5, 5]])
    assert holes.abs().max() < 1e-4  # the band mean, normalised (identity resampling is exact to float32)
    assert torch.isfinite(s1).all() and torch.isfinite(s2).all()


@pytest.mark.parametrize("size", [12, 20, 8])
def test_full_box_without_flip_is_a_plain_resize(size):
    batch = raw_batch()
    aug = augment(plain_manifest(4), size)
    s1, s2, _ = aug(batch, "cpu")
    base1, base2, _ = augment(plain_manifest(4), 12)({k: batch[k] for k in ("s1", "s2")}, "cpu")  # no geometry
    if size == 12:
        torch.testing.assert_close(s1, base1, atol=1e-4, rtol=0)
    resize = lambda x: F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(s1, resize(base1), atol=1e-4, rtol=0)
    torch.testing.assert_close(s2, resize(base2), atol=1e-4, rtol=0)


def test_flips_mirror_both_modalities():
    batch = raw_batch()
    base1, base2, _ = augment(plain_manifest(4), 12)(batch, "cpu")
    batch["flip"] = torch.tensor([[True, False], [False, True], [True, True]])
    s1, s2, _ = augment(plain_manifest(4), 12)(batch, "cpu")
    for out, base in ((s1, base1), (s2, base2)):
        torch.testing.assert_close(out[0], base[0].flip(-1), atol=1e-4, rtol=0)
        torch.testing.assert_close(out[1], base[1].flip(-2), atol=1e-4, rtol=0)
        torch.testing.assert_close(out[2], base[2].flip(-1, -2), atol=1e-4, rtol=0)


def test_s1_and_s2_get_the_same_geometry():
    b, hw = 16, 24
    yy, xx = torch.meshgrid(torch.arange(hw), torch.arange(hw), indexing="ij")
    pattern = ((yy * 7 + xx * 3) % 50 + (xx // 4) * 20).to(torch.int16)  # asymmetric, integer
    batch = {"s1": pattern.float().expand(b, 2, hw, hw).clone(), "s2": pattern.expand(b, 3, hw, hw).clone()}
    crop, flip = draw_crops(np.random.default_rng(3), b, 0.2, True, True, (hw, hw))
    batch["crop"], batch["flip"] = torch.from_numpy(crop), torch.from_numpy(flip)
    m = plain_manifest(3, s2_nodata=None, mean=[0.0] * 3, std=[1.0] * 3)
    m["stats"]["s1"] = {"mean": [0.0, 0.0], "std": [1.0, 1.0]}
    s1, s2, _ = augment(m, 16)(batch, "cpu")
    assert s1.shape == (b, 2, 16, 16) and s2.shape == (b, 3, 16, 16)
    torch.testing.assert_close(s2, s1[:, :1].expand(b, 3, 16, 16), atol=1e-4, rtol=0)
    assert not torch.allclose(s1[0], s1[1])  # the boxes really differ per sample


def test_augment_on_a_loader_batch(tmp_path):
    manifest = load_manifest(make_shard_set(str(tmp_path), [7, 1, 4], hw=8, s2_channels=4))
    it = iter(ShardLoader(manifest, LoaderSettings(num_workers=0), micro_batch_size=4))
    batch = next(it)
    it.close()
    s1, s2, bad = DeviceAugment.for_manifest(manifest, 16)(batch, "cpu")
    assert s1.shape == (4, 2, 16, 16) and s2.shape == (4, 4, 16, 16) and int(bad) == 0
    assert torch.isfinite(s1).all() and torch.isfinite(s2).all()
