"""Transformer blocks: the MLP, the pre-norm self-attention block, and the two-way
cross-attention block that fuses the Sentinel-1 and Sentinel-2 token streams."""

from __future__ import annotations

from torch import Tensor, nn

from .attention import Attention, CrossAttention

# MAE and ViT use eps=1e-6; torch's default 1e-5 changes nothing in fp32 but we keep
# the published value so that checkpoints behave identically.
LAYER_NORM_EPS = 1e-6


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LAYER_NORM_EPS)


class Mlp(nn.Module):
    """Two-layer GELU MLP. x: (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    x: (B, N, dim) -> (B, N, dim).
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, fused: bool = True
    ) -> None:
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, fused=fused)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class OneWayCrossBlock(nn.Module):
    """One direction of :class:`CrossBlock`: tokens ``x`` read from ``context``.

    x + cross_attn(norm_q(x), norm_context(context)), then x + mlp(norm2(x)).
    x: (B, N, dim), context: (B, M, dim) -> (B, N, dim). The context gets its own
    pre-norm because it comes from the other modality, whose statistics differ.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, fused: bool = True):
        super().__init__()
        self.norm_q = layer_norm(dim)
        self.norm_context = layer_norm(dim)
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias, fused=fused)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_context(context))
        x = x + self.mlp(self.norm2(x))
        return x


class CrossBlock(nn.Module):
    """Two-way cross-attention between the S1 and the S2 token streams (Fus-MAE).

    S1 tokens attend to S2 tokens and S2 tokens attend to S1 tokens, each direction
    with its own norms, attention and MLP. Both directions read the *input* tokens of
    the other modality, so they are computed in parallel and the block is symmetric:
    neither modality sees an already-fused version of the other.

    x_s1: (B, N1, dim), x_s2: (B, N2, dim) -> (B, N1, dim), (B, N2, dim).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, fused: bool = True):
        super().__init__()
        self.s1_from_s2 = OneWayCrossBlock(dim, num_heads, mlp_ratio, qkv_bias, fused)
        self.s2_from_s1 = OneWayCrossBlock(dim, num_heads, mlp_ratio, qkv_bias, fused)

    def forward(self, x_s1: Tensor, x_s2: Tensor) -> tuple[Tensor, Tensor]:
        return self.s1_from_s2(x_s1, x_s2), self.s2_from_s1(x_s2, x_s1)
