"""Analytic training FLOPs of one Fus-MAE sample, for model-FLOPs-utilisation logging.

What is counted: the matmuls (patch-embedding conv, every Linear, and the two
attention products q k^T and attn v), at 2 FLOPs per multiply-add, for the number of
tokens each part really sees: the encoder only the visible tokens (+ CLS), the
decoders the full grid (+ CLS). Norms, softmax, GELU and additions are left out
(a few percent at ViT sizes). Training = forward + backward ≈ 3x forward, since the
backward of a matmul costs two matmuls (gradient w.r.t. input and w.r.t. weight);
the patch embedding, whose input needs no gradient, counts 2x.
This is the convention of MFU as defined in PaLM (Chowdhery et al., 2022), so the
number excludes the recomputation done by activation checkpointing.
"""

from __future__ import annotations

from typing import Union

from .config import FusMAEConfig
from .fusmae import STREAMS
from .masking import num_visible


def _self_block_flops(n: int, dim: int, hidden: int) -> float:
    """Forward FLOPs of a self-attention Block over n tokens."""
    linear = 2 * n * (3 * dim * dim + dim * dim + 2 * dim * hidden)  # qkv, proj, fc1 + fc2
    attention = 2 * 2 * n * n * dim  # q k^T and attn v, summed over heads
    return linear + attention


def _cross_block_flops(n1: int, n2: int, dim: int, hidden: int) -> float:
    """Forward FLOPs of a two-way CrossBlock between streams of n1 and n2 tokens."""

    def one_way(nq: int, nk: int) -> float:
        linear = 2 * nq * (dim * dim + dim * dim + 2 * dim * hidden) + 2 * nk * dim * 2 * dim  # q, proj, mlp; kv
        return linear + 2 * 2 * nq * nk * dim

    return one_way(n1, n2) + one_way(n2, n1)


def estimate_flops_per_sample(cfg: FusMAEConfig, img_size: Union[int, tuple[int, int]]) -> float:
    """Training FLOPs (forward + backward) of one sample of img_size (side, or (H, W)) pixels
    at cfg.mask_ratio."""
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    p = cfg.patch_size
    L = (H // p) * (W // p)
    K = num_visible(L, cfg.mask_ratio)
    streams = STREAMS[cfg.fusion]
    chans = {s: cfg.channels("s1") + cfg.channels("s2") if s == "stack" else cfg.channels(s) for s in streams}
    D, Dd = cfg.embed_dim, cfg.decoder_embed_dim
    hidden, hidden_d = int(D * cfg.mlp_ratio), int(Dd * cfg.mlp_ratio)

    # Patch embedding: every patch is embedded before masking drops the hidden ones.
    # The images need no gradient, so its backward is the weight gradient alone (2x).
    patch_embed = sum(2 * L * p * p * chans[s] * D for s in streams)

    # Encoder blocks.
    fwd = 0
    self_blocks = cfg.depth
    if cfg.fusion == "xattn":
        fwd += _cross_block_flops(K, K, D, hidden)
        self_blocks -= 1
    fwd += self_blocks * _self_block_flops(1 + len(streams) * K, D, hidden)

    # Decoders: one per stream over [CLS, full grid].
    n_dec = 1 + L
    dec_self_blocks = cfg.decoder_depth
    if cfg.decoder == "xattn":
        fwd += _cross_block_flops(n_dec, n_dec, Dd, hidden_d)
        dec_self_blocks -= 1
    for s in streams:
        fwd += 2 * (1 + K) * D * Dd  # decoder embed of the visible latents and CLS
        fwd += dec_self_blocks * _self_block_flops(n_dec, Dd, hidden_d)
        fwd += 2 * n_dec * Dd * p * p * chans[s]  # pixel head
    return 3.0 * fwd + 2.0 * patch_embed
