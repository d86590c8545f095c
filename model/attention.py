"""Multi-head attention: self-attention and cross-attention.

Both modules compute the same thing along two paths chosen by the ``fused`` flag:

* ``fused=True``: :func:`torch.nn.functional.scaled_dot_product_attention`, which
  dispatches to flash / memory-efficient kernels on GPU and a fused kernel on CPU,
  and never materialises the (N_q, N_k) score matrix where a kernel allows it.
* ``fused=False``: the eager reference ``softmax(q k^T * scale) v``, written out so
  that it can be read and stepped through; the equivalence test compares the two.

The flag only switches the kernel: both paths use the same parameters, so a state
dict moves between them unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn


def attend(q: Tensor, k: Tensor, v: Tensor, fused: bool) -> Tensor:
    """Scaled dot-product attention over heads.

    q: (B, heads, N_q, head_dim); k, v: (B, heads, N_k, head_dim) -> (B, heads, N_q, head_dim).
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v)
    # Scale q before the product (not the scores after it): same result, and the
    # smaller operands keep bf16 products further from overflow.
    scale = q.shape[-1] ** -0.5
    scores = (q * scale) @ k.transpose(-2, -1)  # (B, heads, N_q, N_k)
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head self-attention. x: (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, fused: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused = fused
        # One projection for q, k and v: a single larger matmul is faster than three.
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        x = attend(q, k, v, self.fused)  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj(x)


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from ``x``, keys and values from ``context``.

    x: (B, N_q, dim), context: (B, N_k, context_dim) -> (B, N_q, dim).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        fused: bool = True,
        context_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused = fused
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, N, D = x.shape
        M = context.shape[1]
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, hd)
        kv = self.kv(context).reshape(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, heads, M, head_dim)
        x = attend(q, k, v, self.fused)  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj(x)
