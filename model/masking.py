"""Random patch masking by sorting noise (MAE), per sample, without host syncs.

The trick: draw one uniform number per patch, sort the patches by it, keep the first
K. Sorting uniform noise is a uniformly random permutation, so the kept set is a
uniform random K-subset of the grid, drawn for the whole batch in one argsort with no
Python loop and no data-dependent shapes (every sample keeps exactly K patches, so
the visible tokens still form a dense (B, K, D) tensor). ``argsort`` of that
permutation is its inverse, ``ids_restore``, which puts the decoder's tokens back
into grid order.

Consistent masking across modalities = feeding the same noise to both; independent
masking = separate noise per modality.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class Masking(NamedTuple):
    """One masking draw for a (B, L) patch grid, K = visible patches per sample."""

    ids_keep: Tensor
    """(B, K) int64 grid indices of the visible patches, in the order the encoder sees them."""
    mask: Tensor
    """(B, L) float32, 1 = masked, 0 = visible, in grid order."""
    ids_restore: Tensor
    """(B, L) int64: position of grid patch i in [visible..., masked...] order."""


def num_visible(length: int, mask_ratio: float) -> int:
    """Visible patches per sample: round(L * (1 - r)) (Python's round, half to even)."""
    return int(round(length * (1.0 - mask_ratio)))


def random_masking(noise: Tensor, mask_ratio: float) -> Masking:
    """Masking from noise: (B, L) -> Masking; the patches with the smallest noise stay visible."""
    B, L = noise.shape
    keep = num_visible(L, mask_ratio)
    ids_shuffle = noise.argsort(dim=1)  # (B, L): ascending noise -> kept first
    ids_restore = ids_shuffle.argsort(dim=1)  # inverse permutation
    ids_keep = ids_shuffle[:, :keep]
    # Build the mask in shuffled order (first K visible), then unshuffle to grid order.
    mask = torch.ones(B, L, device=noise.device, dtype=torch.float32)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(ids_keep, mask, ids_restore)


def draw_masks(
    strategy: str,
    num_streams: int,
    batch: int,
    length: int,
    mask_ratio: float,
    device: torch.device,
    generator: Optional[torch.Generator] = None,
    noise: Optional[Tensor] = None,
) -> list[Masking]:
    """One :class:`Masking` per token stream.

    strategy: "consistent" (one noise, the same positions masked in every stream) or
    "independent" (separate noise per stream). ``generator`` (on ``device``) makes the
    draw reproducible; ``noise`` replaces the draw: (B, L) for consistent masking or a
    single stream, (num_streams, B, L) for independent masking.
    """
    if strategy not in ("consistent", "independent"):
        raise ValueError(f"model.masking: unknown strategy {strategy!r}")
    draws = num_streams if strategy == "independent" else 1
    if noise is None:
        noise = torch.rand(draws, batch, length, device=device, generator=generator)
    elif draws == 1 and noise.shape == (batch, length):
        noise = noise.unsqueeze(0)
    if tuple(noise.shape) != (draws, batch, length):
        expected = (batch, length) if draws == 1 else (draws, batch, length)
        raise ValueError(f"masking noise has shape {tuple(noise.shape)}, expected {expected}")
    masks = [random_masking(n, mask_ratio) for n in noise]
    return masks * num_streams if draws == 1 else masks


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """Select tokens per sample: x (B, L, D), ids (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
