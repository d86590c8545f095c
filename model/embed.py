"""From images to tokens and back: patch embedding, the fixed 2-D sin-cos positional
embedding, and the patchify / unpatchify pair that defines the reconstruction targets.

Grid order everywhere is row-major: token ``i`` covers patch row ``i // w`` and patch
column ``i % w`` of an (h, w) patch grid, which is what ``Conv2d(...).flatten(2)``
produces and what :func:`patchify` and :func:`sincos_pos_embed_2d` follow.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a conv with kernel = stride = patch.

    x: (B, C, H, W) with H, W divisible by the patch -> (B, L, dim), L = (H/p) * (W/p),
    tokens in row-major grid order.

    The learned modality embedding (1, 1, dim) of this token stream lives here too and is
    added in ``forward``: ZeRO-3 gathers a module's parameters only around that module's
    own forward, so a parameter must be used by the module that owns it.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.modality_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, L, D)
        return x + self.modality_embed


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """Sin-cos embedding of positions. pos: (N,) -> (N, dim): [sin(pos*w_i) | cos(pos*w_i)],
    with frequencies w_i = 10000^(-i / (dim/2)), i = 0 .. dim/2 - 1 (Vaswani et al.)."""
    if dim % 2 != 0:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> Tensor:
    """Fixed 2-D sin-cos positional embedding for an (h, w) patch grid -> (h*w, dim) float32.

    As in MAE, the first half of the channels encodes the column index and the second
    half the row index, each with :func:`sincos_1d`; rows are in row-major grid order.
    Computed in float64 so that large grids do not lose the high-frequency terms.
    """
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    return emb.float()


class SinCosPosEmbed(nn.Module):
    """Cache of :func:`sincos_pos_embed_2d` per (h, w, device).

    Not a buffer: the embedding is a pure function of the grid, so it stays out of the
    state dict and any input size divisible by the patch works without resizing
    anything. forward(h, w, device) -> (1, h*w, dim) float32.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self._cache: dict[tuple[int, int, torch.device], Tensor] = {}

    def forward(self, h: int, w: int, device: torch.device) -> Tensor:
        key = (h, w, torch.device(device))
        if key not in self._cache:
            # Built outside inference mode / autograd so that a grid first seen under
            # torch.inference_mode() can still be used in a later training step.
            with torch.inference_mode(False), torch.no_grad():
                self._cache[key] = sincos_pos_embed_2d(self.dim, h, w).to(device).unsqueeze(0)
        return self._cache[key]


def patchify(imgs: Tensor, p: int) -> Tensor:
    """Images to flattened patches: (B, C, H, W) -> (B, L, p*p*C), L = (H/p) * (W/p).

    Patches are in row-major grid order; inside a patch the element order is
    (pixel row, pixel column, channel), channel fastest, i.e. element
    ``(i * p + j) * C + c`` is pixel (i, j) of channel c (MAE's layout).
    """
    B, C, H, W = imgs.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by patch size {p}")
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum("bchiwj->bhwijc", x)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: Tensor, p: int, C: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`patchify`: (B, h*w, p*p*C) -> (B, C, h*p, w*p), same element order."""
    B, L, K = x.shape
    if L != h * w or K != p * p * C:
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} into C={C}, grid {h}x{w}, patch {p}")
    x = x.reshape(B, h, w, p, p, C)
    x = torch.einsum("bhwijc->bchiwj", x)
    return x.reshape(B, C, h * p, w * p)
