"""Augmentation of loader batches: random crops and flips drawn in the loader workers (`draw_crops`),
normalisation and resampling applied on the training device (`DeviceAugment`).

The loader's workers only draw the random numbers (crop boxes, flips) and
assemble raw arrays; the float conversion, the per-band normalisation and the
resampling run on the GPU for the whole micro batch at once, with no host
synchronisation.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.manifest import Manifest

STD_FLOOR = 1e-6
"""A band with (near) zero spread is divided by this instead of its std."""


def _nodata(value: Any) -> Optional[float]:
    """The manifest's no-data value as a number; None for 'non-finite' (handled by the finite check) or absent."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def draw_crops(rng: np.random.Generator, n: int, scale_min: float, hflip: bool, vflip: bool,
               hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Random resized crop boxes (n, 4) float32 (y0, x0, h, w) in fractions of the image, flips (n, 2) bool (h, v).

    As torchvision's RandomResizedCrop: area fraction uniform in [scale_min, 1], log aspect
    ratio (w/h in pixels) uniform in [log 3/4, log 4/3], ten tries, else the whole image;
    boxes stay continuous (no rounding to pixels). Always draws the same numbers, so the
    flags do not shift the crops.
    """
    tries = 10
    H, W = hw
    area = rng.uniform(scale_min, 1.0, (n, tries))
    ratio = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), (n, tries)))
    w = np.sqrt(area * ratio * H / W)
    h = np.sqrt(area / ratio * W / H)
    ok = (w <= 1.0) & (h <= 1.0)
    first = np.argmax(ok, axis=1)
    rows = np.arange(n)
    h = np.where(ok.any(axis=1), h[rows, first], 1.0)
    w = np.where(ok.any(axis=1), w[rows, first], 1.0)
    u = rng.random((n, 2))
    crop = np.stack([u[:, 0] * (1 - h), u[:, 1] * (1 - w), h, w], axis=1).astype(np.float32)
    flip = rng.random((n, 2)) < 0.5
    flip[:, 0] &= hflip
    flip[:, 1] &= vflip
    return crop, flip


def full_boxes(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole image, unflipped, for ``n`` samples: what a pass without augmentation carries."""
    return np.tile(np.array([0, 0, 1, 1], np.float32), (n, 1)), np.zeros((n, 2), bool)


class DeviceAugment(nn.Module):
    """Raw loader batch → normalised, cropped, flipped float32 images on ``device``.

    ``augment(batch, device) -> (s1, s2, nonfinite)``:

    - s1 (B, 2, S, S), s2 (B, C, S, S) float32, S = ``image_size``: per band
      ``(x - mean) / max(std, 1e-6)`` with the manifest's statistics; non-finite pixels
      and pixels equal to the modality's no-data value are set to the band mean first
      (so they become 0);
    - the batch's random resized crop boxes and flips, applied by one
      ``affine_grid`` + ``grid_sample`` (bilinear, align_corners=False, border padding)
      over the channels of both modalities together, so S1 and S2 get exactly the same
      geometry; without ``crop`` in the batch (evaluation), a plain bilinear resize;
    - nonfinite: 0-dim int64 tensor, non-finite input pixels of both modalities
      (read it at log intervals; it is not synchronised here).
    """

    def __init__(self, stats: Mapping[str, Mapping[str, Any]], nodata: Mapping[str, Any], image_size: int):
        """stats: {'s1'|'s2': {'mean': [...], 'std': [...]}} per band; nodata: {'s1'|'s2': value or 'non-finite'}."""
        super().__init__()
        self.image_size = int(image_size)
        for m in ("s1", "s2"):
            mean = torch.tensor(stats[m]["mean"], dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(stats[m]["std"], dtype=torch.float32).clamp_min(STD_FLOOR).view(1, -1, 1, 1)
            self.register_buffer(f"{m}_mean", mean, persistent=False)
            self.register_buffer(f"{m}_inv_std", 1.0 / std, persistent=False)
        self.s1_nodata = _nodata(nodata.get("s1"))
        self.s2_nodata = _nodata(nodata.get("s2"))

    @classmethod
    def for_manifest(cls, manifest: Manifest, image_size: int) -> "DeviceAugment":
        """Normalised with ``manifest``'s statistics and no-data values."""
        return cls(manifest.stats, {m: manifest.modalities[m].get("nodata") for m in ("s1", "s2")}, image_size)

    def normalise(self, x: Tensor, mean: Tensor, inv_std: Tensor, nodata: Optional[float]) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) raw → float32 normalised; invalid pixels → band mean before normalising."""
        floating = x.is_floating_point()
        x = x.float()
        if floating:
            bad = ~torch.isfinite(x)
            count = bad.sum()
        else:  # integer reflectances cannot be non-finite
            bad = None
            count = torch.zeros((), dtype=torch.int64, device=x.device)
        if nodata is not None:
            hole = x == nodata
            bad = hole if bad is None else bad | hole
        if bad is not None:
            x = torch.where(bad, mean, x)
        return (x - mean) * inv_std, count

    def geometry(self, x: Tensor, crop: Optional[Tensor], flip: Optional[Tensor]) -> Tensor:
        """Crop boxes (B, 4) (y0, x0, h, w) in image fractions and flips (B, 2) (h, v) → (B, C, S, S)."""
        B, C = x.shape[:2]
        S = self.image_size
        if crop is None:
            if x.shape[-2:] == (S, S):
                return x
            return F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
        crop = crop.to(x.device, torch.float32, non_blocking=True)
        y0, x0, h, w = crop.unbind(1)
        if flip is None:
            sx = sy = torch.ones_like(h)
        else:
            flip = flip.to(x.device, non_blocking=True)
            sx = 1.0 - 2.0 * flip[:, 0].float()  # -1 mirrors the output's x axis inside the box
            sy = 1.0 - 2.0 * flip[:, 1].float()
        zero = torch.zeros_like(h)
        # Output coordinates u in [-1, 1] map to input coordinates centre + half-size * u (normalised).
        theta = torch.stack([
            torch.stack([w * sx, zero, 2.0 * x0 + w - 1.0], dim=1),
            torch.stack([zero, h * sy, 2.0 * y0 + h - 1.0], dim=1),
        ], dim=1)  # (B, 2, 3)
        grid = F.affine_grid(theta, [B, C, S, S], align_corners=False)  # (B, S, S, 2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def forward(self, batch: Mapping[str, Any], device: Union[str, torch.device]) -> tuple[Tensor, Tensor, Tensor]:
        device = torch.device(device)
        if self.s1_mean.device != device:
            self.to(device)
        s1 = batch["s1"].to(device, non_blocking=True)  # (B, 2, H, W) raw dtype
        s2 = batch["s2"].to(device, non_blocking=True)  # (B, C, H, W) raw dtype
        s1, bad1 = self.normalise(s1, self.s1_mean, self.s1_inv_std, self.s1_nodata)
        s2, bad2 = self.normalise(s2, self.s2_mean, self.s2_inv_std, self.s2_nodata)
        both = torch.cat([s1, s2], dim=1)  # (B, 2 + C, H, W): one resampling, identical geometry
        both = self.geometry(both, batch.get("crop"), batch.get("flip"))
        return both[:, : s1.shape[1]], both[:, s1.shape[1]:], bad1 + bad2
