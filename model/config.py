"""Configuration of the Fus-MAE network: one dataclass, presets in one table.

The architecture fields (`embed_dim`, `depth`, ...) default to ``None`` and are
filled from the ``size`` preset in ``__post_init__``; any field given explicitly
wins over the preset. That keeps YAML recipes short (``model: {size: vit_b}``)
while every field stays overridable from the command line
(``model.depth=6``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

# Encoder presets: (embed_dim, depth, num_heads). The ViT sizes are the standard
# ones (Dosovitskiy et al.); `tiny` exists so that tests run in seconds on CPU.
ENCODER_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=64, depth=3, num_heads=4),
    "vit_s": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16),
}
# Decoder presets follow MAE (512 wide, 8 deep) for the ViT sizes; a lighter
# decoder is enough for the small encoders and keeps the MAE asymmetry.
DECODER_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4),
    "vit_s": dict(decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    "vit_b": dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "vit_l": dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}

FUSIONS = ("xattn", "concat", "stack", "s1", "s2")
DECODERS = ("separate", "xattn")
MASKINGS = ("consistent", "independent")
POOLS = ("mean", "cls")
STANDARD_CHANNELS = {"s1": 2, "s2": 13}
"""Bands of the full products (S1 GRD VV+VH, S2 L1C): what `FusMAEConfig.preset` assumes when not told."""


@dataclass
class FusMAEConfig:
    size: str = "tiny"
    """Preset that fills the architecture fields left at None: tiny, vit_s, vit_b, vit_l."""
    img_size: int = 224
    """Nominal input side in pixels (10 m grid). The sin-cos positional embedding is
    computed for the actual input grid, so other sizes divisible by the patch work too."""
    patch_size: int = 16
    """Patch side in pixels; 8 or 16 in the recipes."""
    s1_channels: Optional[int] = None
    """Sentinel-1 bands (VV, VH: backscatter in dB). None: taken from the shards' manifest by training
    and evaluation (`launch.data.fit.derive_bands`); `preset` fills 2 when building a network by hand."""
    s2_channels: Optional[int] = None
    """Sentinel-2 bands: 13 for L1C (B1..B12 with B8A), 12 for L2A / BigEarthNet (no B10). None: from the
    manifest, as for s1_channels; `preset` fills 13."""
    s1_bands: Optional[list[str]] = None
    """The S1 band names in input order, as the shards' manifest lists them: recorded in checkpoints and
    exports so that evaluation can match downstream bands by name. Sets s1_channels when that is None."""
    s2_bands: Optional[list[str]] = None
    """The S2 band names in input order (e.g. ESA's B1..B12 with B8A); as s1_bands."""

    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    """Encoder blocks in total; with fusion=xattn the first one is the cross-attention block."""
    num_heads: Optional[int] = None
    decoder_embed_dim: Optional[int] = None
    decoder_depth: Optional[int] = None
    """Decoder blocks per modality; with decoder=xattn the first one is a cross-attention block."""
    decoder_num_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True

    fusion: str = "xattn"
    """Encoder fusion: xattn (cross-attention first block, Fus-MAE), concat (joint
    self-attention on both token sets), stack (channel-stacked single image), s1, s2."""
    decoder: str = "separate"
    """separate: one decoder per modality; xattn: cross-attention between the two
    decoder streams (feature-level fusion). xattn needs two token streams."""
    masking: str = "consistent"
    """consistent: the same grid positions are masked in both modalities; independent."""
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    """Reconstruct per-patch normalised pixels (MAE's variant); off by default because
    S1 dB patches are often near-constant over water, where the normalisation blows up noise."""
    loss_weight_s1: float = 1.0
    loss_weight_s2: float = 1.0
    pool: str = "mean"
    """Pooling of `encode`: mean of all patch tokens of both modalities, or the CLS token."""

    fused_attn: bool = True
    """Attention through torch SDPA (flash / memory-efficient kernels); False selects the
    eager reference path, kept for equivalence tests."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (saves memory)."""

    def __post_init__(self) -> None:
        for mod in ("s1", "s2"):
            bands = getattr(self, f"{mod}_bands")
            if bands is not None:
                setattr(self, f"{mod}_bands", [str(b) for b in bands])
                if getattr(self, f"{mod}_channels") is None:
                    setattr(self, f"{mod}_channels", len(bands))
        if self.size not in ENCODER_PRESETS:
            raise ValueError(f"model.size: unknown preset {self.size!r}; choose one of {sorted(ENCODER_PRESETS)}")
        for key, value in {**ENCODER_PRESETS[self.size], **DECODER_PRESETS[self.size]}.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.validate()

    def validate(self) -> None:
        def check(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"model.{key}: {msg}")

        check(self.fusion in FUSIONS, "fusion", f"{self.fusion!r} is not one of {FUSIONS}")
        check(self.decoder in DECODERS, "decoder", f"{self.decoder!r} is not one of {DECODERS}")
        check(self.masking in MASKINGS, "masking", f"{self.masking!r} is not one of {MASKINGS}")
        check(self.pool in POOLS, "pool", f"{self.pool!r} is not one of {POOLS}")
        check(
            not (self.decoder == "xattn" and self.fusion in ("stack", "s1", "s2")),
            "decoder",
            f"'xattn' needs two token streams, but fusion={self.fusion!r} has one; use decoder=separate",
        )
        check(0.0 <= self.mask_ratio < 1.0, "mask_ratio", f"must be in [0, 1), got {self.mask_ratio}")
        check(self.patch_size > 0 and self.img_size % self.patch_size == 0, "img_size",
              f"{self.img_size} is not divisible by patch_size={self.patch_size}")
        check(self.embed_dim % self.num_heads == 0, "embed_dim",
              f"{self.embed_dim} is not divisible by num_heads={self.num_heads}")
        check(self.decoder_embed_dim % self.decoder_num_heads == 0, "decoder_embed_dim",
              f"{self.decoder_embed_dim} is not divisible by decoder_num_heads={self.decoder_num_heads}")
        check(self.embed_dim % 4 == 0, "embed_dim", f"{self.embed_dim} must be a multiple of 4 (2-D sin-cos embedding)")
        check(self.decoder_embed_dim % 4 == 0, "decoder_embed_dim",
              f"{self.decoder_embed_dim} must be a multiple of 4 (2-D sin-cos embedding)")
        check(self.depth >= (2 if self.fusion == "xattn" else 1), "depth",
              "fusion=xattn needs depth >= 2 (one cross-attention block, then self-attention)")
        check(self.decoder_depth >= 1, "decoder_depth", "must be >= 1")
        for mod in ("s1", "s2"):
            n, bands = getattr(self, f"{mod}_channels"), getattr(self, f"{mod}_bands")
            check(n is None or n > 0, f"{mod}_channels", f"must be positive, got {n}")
            check(bands is None or n == len(bands), f"{mod}_channels",
                  f"{n} contradicts model.{mod}_bands, which names {len(bands or [])}: {bands}")
            check(bands is None or len(set(bands)) == len(bands), f"{mod}_bands", f"names a band twice: {bands}")
        check(self.loss_weight_s1 >= 0 and self.loss_weight_s2 >= 0, "loss_weight_s1", "loss weights must be >= 0")

    @classmethod
    def preset(cls, size: str, **overrides: Any) -> "FusMAEConfig":
        """``FusMAEConfig.preset("vit_b", fusion="concat", patch_size=8)``: a network built by hand, so
        the band counts not given (by count or by names) are the full products': 2 S1 and 13 S2 (L1C)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"model: unknown field(s) {unknown}")
        for mod, n in STANDARD_CHANNELS.items():
            if overrides.get(f"{mod}_channels") is None and overrides.get(f"{mod}_bands") is None:
                overrides[f"{mod}_channels"] = n
        return cls(size=size, **overrides)

    def channels(self, mod: str) -> int:
        """Input bands of modality ``mod`` (s1, s2); an error naming the field when it was never set."""
        n = getattr(self, f"{mod}_channels")
        if n is None:
            raise ValueError(f"model.{mod}_channels is not set: training and evaluation take it from the "
                             f"shards' manifest; set it (or model.{mod}_bands) when building a network by hand")
        return int(n)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def uses_s1(self) -> bool:
        return self.fusion != "s2"

    @property
    def uses_s2(self) -> bool:
        return self.fusion != "s1"
