"""Pictures of what the model reconstructs: S2 true colour and S1 composites.

Each row of the figure is one sample: for S2 (B4, B3, B2 as red, green, blue)
and for S1 (VV, VH, VV−VH as red, green, blue) the input, the masked input the
encoder saw, and the reconstruction with the visible patches pasted back.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from model import FusMAEOutput, unpatchify


def _composite(img: np.ndarray, kind: str, bands: Sequence[str]) -> np.ndarray:
    """img: (C, H, W) normalised values → (H, W, 3) display composite."""
    if kind == "s2":
        idx = [list(bands).index(b) for b in ("B4", "B3", "B2")] if {"B4", "B3", "B2"} <= set(bands) else [0, 1, 2]
        rgb = np.stack([img[i] for i in idx], axis=-1)
    else:
        vv, vh = img[0], img[1]
        rgb = np.stack([vv, vh, vv - vh], axis=-1)
    return rgb


def _reconstruction(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool):
    """Patch-space reconstruction with visible patches taken from the input: (C, H, W) tensors."""
    from model import patchify

    C, H, W = target.shape
    t = patchify(target[None], p)[0]  # (L, p*p*C)
    pr = pred.float()
    if norm_pix:  # predictions are per-patch normalised: put each patch's mean/var back
        mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
        pr = pr * (var + 1e-6).sqrt() + mean
    m = mask[:, None].float()
    merged = pr * m + t * (1 - m)
    masked = t * (1 - m) + m * t.min()
    return (unpatchify(masked[None], p, C, H // p, W // p)[0], unpatchify(merged[None], p, C, H // p, W // p)[0])


def save_reconstructions(path: str, s1: Optional[torch.Tensor], s2: Optional[torch.Tensor], out: FusMAEOutput,
                         patch_size: int, norm_pix: bool, s2_bands: Sequence[str], max_rows: int = 4,
                         title: str = "") -> str:
    """Write a PNG of inputs / masked inputs / reconstructions for the first ``max_rows`` samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods = [(k, x, getattr(out, f"pred_{k}"), getattr(out, f"mask_{k}")) for k, x in (("s2", s2), ("s1", s1))
            if x is not None and getattr(out, f"pred_{k}") is not None]
    n = min(max_rows, next(iter(mods))[1].shape[0])
    fig, axes = plt.subplots(n, 3 * len(mods), figsize=(2.2 * 3 * len(mods), 2.2 * n), squeeze=False)
    for col0, (kind, x, pred, mask) in enumerate(mods):
        for r in range(n):
            target = x[r].detach().float().cpu()
            masked, recon = _reconstruction(target, pred[r].detach().cpu(), mask[r].detach().cpu(), patch_size, norm_pix)
            panels = [target, masked, recon]
            ref = _composite(target.numpy(), kind, s2_bands)
            lo = np.nanpercentile(ref, 2, axis=(0, 1))
            hi = np.nanpercentile(ref, 98, axis=(0, 1))
            for j, img in enumerate(panels):
                rgb = _composite(img.numpy(), kind, s2_bands)
                rgb = np.clip((rgb - lo) / np.maximum(hi - lo, 1e-6), 0, 1)  # same stretch for the three panels
                ax = axes[r][col0 * 3 + j]
                ax.imshow(rgb)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    name = "S2 true colour" if kind == "s2" else "S1 VV/VH/ratio"
                    ax.set_title(f"{name}\n{['input', 'masked', 'reconstruction'][j]}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
