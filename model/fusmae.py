"""Fus-MAE: a masked autoencoder over Sentinel-1 SAR and Sentinel-2 multispectral
patches, fused by cross-attention (Chan-To-Hing & Veeravalli, arXiv 2401.02764).

The forward pass is split into MAE's named stages::

    images -> _embed -> masking -> forward_encoder -> forward_decoder -> forward_loss

Modules are grouped by name for a clean encoder export: everything the encoder needs
lives under top-level attributes that do *not* start with ``decoder``
(``patch_embed`` with the modality embeddings, ``cls_token``, ``blocks``, ``norm``), and all of
the decoder under ``decoder*`` attributes, so ``encoder_state_dict`` is a key filter.

Token streams. The encoder works on one or two streams of patch tokens, named by
``STREAMS[cfg.fusion]``: ``s1`` and ``s2`` for the fusion modes, ``stack`` for the
channel-stacked baseline (one image of s1_channels + s2_channels bands), or a single
modality. Each stream has its own patch embedding, modality embedding, mask and
decoder; the outputs are always reported per modality (``*_s1``, ``*_s2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .blocks import Block, CrossBlock, layer_norm
from .config import FusMAEConfig
from .embed import PatchEmbed, SinCosPosEmbed, patchify
from .masking import Masking, draw_masks, gather_tokens

STREAMS: dict[str, tuple[str, ...]] = {
    "xattn": ("s1", "s2"),
    "concat": ("s1", "s2"),
    "stack": ("stack",),
    "s1": ("s1",),
    "s2": ("s2",),
}

# Floor of the per-patch variance in norm_pix_loss (MAE's value): a constant patch
# (calm water in S1, saturated cloud in S2) would otherwise divide by zero.
NORM_PIX_EPS = 1e-6


@dataclass
class FusMAEOutput:
    """Result of a pre-training forward pass; fields of an absent modality are None.

    Losses are 0-dim float32 tensors. Masks are (B, L) float, 1 = masked, in row-major
    grid order. Predictions are (B, L, p*p*C) in the layout of ``patchify(s1, p)`` /
    ``patchify(s2, p)`` (raw pixels; normalised pixels when cfg.norm_pix_loss).
    """

    loss: Tensor
    loss_s1: Optional[Tensor] = None
    loss_s2: Optional[Tensor] = None
    mask_s1: Optional[Tensor] = None
    mask_s2: Optional[Tensor] = None
    pred_s1: Optional[Tensor] = None
    pred_s2: Optional[Tensor] = None


class EncoderLoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class ClassToken(nn.Module):
    """The learned CLS token, as a module of its own: ZeRO-3 gathers a parameter only around the
    forward of the module that owns it, and the root module's own parameters are not safe there."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, batch_size: int) -> Tensor:
        return self.token.expand(batch_size, -1, -1)  # (B, 1, D)


class ModalityDecoder(nn.Module):
    """The decoder of one token stream: embed the visible latents, fill the grid with
    mask tokens, self-attention blocks, then a linear pixel head.

    ``forward`` builds the token sequence: it must be a module call (not a plain method)
    so that ZeRO-3 gathers this module's own parameters (mask token, modality embedding).
    The blocks are run by :meth:`FusMAE.forward_decoder` (so that activation
    checkpointing and the optional cross-attention block stay in one place); this
    module owns the parameters and the two ends of the pipeline.
    """

    def __init__(self, cfg: FusMAEConfig, num_blocks: int, out_dim: int) -> None:
        super().__init__()
        dim = cfg.decoder_embed_dim
        self.embed = nn.Linear(cfg.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.modality_embed = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            Block(dim, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.fused_attn) for _ in range(num_blocks)
        )
        self.norm = layer_norm(dim)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, cls: Tensor, latents: Tensor, ids_restore: Tensor, pos: Tensor) -> Tensor:
        """cls: (B, 1, D), latents: (B, K, D) visible tokens in encoder order,
        ids_restore: (B, L), pos: (1, L, Dd) -> (B, 1 + L, Dd): [CLS, full grid]."""
        x = self.embed(latents)  # (B, K, Dd)
        B, K, _ = x.shape
        L = ids_restore.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(B, L - K, -1)
        x = torch.cat([x, mask_tokens], dim=1)  # (B, L, Dd), [visible..., masked...]
        x = gather_tokens(x, ids_restore)  # unshuffle into grid order
        x = x + pos + self.modality_embed
        cls = self.embed(cls).to(x.dtype)
        return torch.cat([cls, x], dim=1)

    def predict(self, x: Tensor) -> Tensor:
        """(B, 1 + L, Dd) -> (B, L, out_dim) pixel predictions; the CLS token is dropped."""
        return self.pred(self.norm(x))[:, 1:]


class FusMAE(nn.Module):
    """Masked autoencoder over S1 (B, s1_channels, H, W) and S2 (B, s2_channels, H, W).

    H and W may be any multiples of cfg.patch_size; L = (H/p) * (W/p) patches.
    See :class:`model.config.FusMAEConfig` for the fusion, decoder and masking modes.
    """

    def __init__(self, cfg: FusMAEConfig) -> None:
        super().__init__()
        cfg.validate()  # configs edited after construction are checked again here
        self.cfg = cfg
        self.streams = STREAMS[cfg.fusion]
        self.grad_checkpointing = cfg.grad_checkpointing
        D, p = cfg.embed_dim, cfg.patch_size
        # channels() names the field when a band count was never set (it comes from the manifest)
        chans = {s: cfg.channels("s1") + cfg.channels("s2") if s == "stack" else cfg.channels(s) for s in self.streams}

        # --- encoder: every attribute here must not start with "decoder" ---
        self.patch_embed = nn.ModuleDict({s: PatchEmbed(chans[s], D, p) for s in self.streams})
        self.pos_embed = SinCosPosEmbed(D)  # fixed, shared by the streams; no parameters
        self.cls_token = ClassToken(D)
        block_args = (cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.fused_attn)
        first = [CrossBlock(D, *block_args)] if cfg.fusion == "xattn" else []
        self.blocks = nn.ModuleList(first + [Block(D, *block_args) for _ in range(cfg.depth - len(first))])
        self.norm = layer_norm(D)

        # --- decoder ---
        Dd = cfg.decoder_embed_dim
        dec_args = (cfg.decoder_num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.fused_attn)
        self.decoder_cross = CrossBlock(Dd, *dec_args) if cfg.decoder == "xattn" else None
        self.decoder_pos_embed = SinCosPosEmbed(Dd)
        self_blocks = cfg.decoder_depth - (1 if self.decoder_cross is not None else 0)
        # The stack decoder predicts [p*p*C1 | p*p*C2] so that each half is in the
        # patchify layout of its own modality (see forward_loss).
        self.decoders = nn.ModuleDict({s: ModalityDecoder(cfg, self_blocks, p * p * chans[s]) for s in self.streams})

        self._init_weights()

    # ------------------------------------------------------------------ init
    def _init_weights(self) -> None:
        self.apply(_init_module)
        # MAE: initialise the patch projection like a Linear on the flattened patch.
        for embed in self.patch_embed.values():
            w = embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(embed.proj.bias)
        for name, param in self.named_parameters():
            if _is_token(name):
                nn.init.normal_(param, std=0.02)

    # ---------------------------------------------------------------- stages
    def _run(self, block: nn.Module, *xs: Tensor):
        """Run one block, recomputing its activations in backward when checkpointing."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *xs, use_reentrant=False)
        return block(*xs)

    def _stream_images(self, s1: Optional[Tensor], s2: Optional[Tensor]) -> dict[str, Tensor]:
        """Check the inputs and arrange them as stream name -> (B, C, H, W)."""
        cfg = self.cfg
        given = {}
        for name, img, chans, used in (
            ("s1", s1, cfg.s1_channels, cfg.uses_s1),
            ("s2", s2, cfg.s2_channels, cfg.uses_s2),
        ):
            if not used:
                continue
            if img is None:
                raise ValueError(f"fusion={cfg.fusion!r} needs the {name} input, got None")
            if img.ndim != 4 or img.shape[1] != chans:
                raise ValueError(f"{name} must be (B, {chans}, H, W), got {tuple(img.shape)}")
            given[name] = img
        if len({(img.shape[0], *img.shape[-2:]) for img in given.values()}) > 1:
            shapes = [tuple(x.shape) for x in given.values()]
            raise ValueError(f"s1 and s2 must share batch size and H, W; got {shapes}")
        H, W = next(iter(given.values())).shape[-2:]
        p = cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not divisible by patch_size={p}")
        if cfg.fusion == "stack":
            return {"stack": torch.cat([given["s1"], given["s2"]], dim=1)}
        return given

    def _embed(self, images: dict[str, Tensor]) -> tuple[dict[str, Tensor], tuple[int, int]]:
        """Patch tokens + positional + modality embedding per stream -> {stream: (B, L, D)}, grid (h, w)."""
        any_img = next(iter(images.values()))
        h, w = any_img.shape[-2] // self.cfg.patch_size, any_img.shape[-1] // self.cfg.patch_size
        pos = self.pos_embed(h, w, any_img.device)  # (1, L, D), the same grid for every stream
        tokens = {}
        for s, img in images.items():
            x = self.patch_embed[s](img)  # (B, L, D), modality embedding included
            tokens[s] = x + pos.to(x.dtype)  # in the tokens' dtype so that bf16 models stay bf16
        return tokens, (h, w)

    def forward_encoder(
        self, tokens: dict[str, Tensor], masks: Optional[list[Masking]] = None
    ) -> tuple[Tensor, list[int]]:
        """Encode the (visible) tokens of every stream.

        tokens: {stream: (B, L, D)}; masks: one Masking per stream, or None to keep all
        tokens in grid order. Returns the normed sequence (B, 1 + sum(K_s), D) laid out
        as [CLS, stream 0 tokens, stream 1 tokens] and the per-stream lengths K_s.
        """
        xs = [tokens[s] for s in self.streams]
        if masks is not None:
            xs = [gather_tokens(x, m.ids_keep) for x, m in zip(xs, masks)]  # (B, K, D) each
        blocks = self.blocks
        if self.cfg.fusion == "xattn":
            # Early fusion: the modalities exchange information once, by cross-attention,
            # before the joint self-attention blocks.
            xs = list(self._run(blocks[0], *xs))
            blocks = blocks[1:]
        cls = self.cls_token(xs[0].shape[0])  # (B, 1, D)
        dtype = xs[0].dtype
        x = torch.cat([cls.to(dtype), *(t.to(dtype) for t in xs)], dim=1)  # (B, 1 + sum K, D)
        for block in blocks:
            x = self._run(block, x)
        return self.norm(x), [t.shape[1] for t in xs]

    def forward_decoder(
        self, latent: Tensor, lengths: list[int], masks: list[Masking], grid: tuple[int, int]
    ) -> dict[str, Tensor]:
        """latent: (B, 1 + sum K, D) from forward_encoder -> {stream: (B, L, p*p*C)}."""
        cls, *latents = latent.split([1, *lengths], dim=1)
        pos = self.decoder_pos_embed(*grid, latent.device).to(latent.dtype)  # (1, L, Dd)
        xs = [
            self.decoders[s](cls, lat, m.ids_restore, pos)  # (B, 1 + L, Dd)
            for s, lat, m in zip(self.streams, latents, masks)
        ]
        if self.decoder_cross is not None:
            # Feature-level fusion: the two decoder streams exchange information once.
            xs = list(self._run(self.decoder_cross, *xs))
        preds = {}
        for s, x in zip(self.streams, xs):
            for block in self.decoders[s].blocks:
                x = self._run(block, x)
            preds[s] = self.decoders[s].predict(x)
        return preds

    def reconstruction_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """MSE on the masked patches: imgs (B, C, H, W), pred (B, L, p*p*C), mask (B, L) -> 0-dim.

        Mean over the pixel values of a patch, then mean over the masked patches of the
        batch. Always float32: under bf16 autocast the squared errors of a nearly
        converged model would round to a handful of distinct values.
        """
        with torch.autocast(device_type=pred.device.type, enabled=False):
            target = patchify(imgs.float(), self.cfg.patch_size)  # (B, L, p*p*C)
            if self.cfg.norm_pix_loss:
                mean = target.mean(dim=-1, keepdim=True)
                var = target.var(dim=-1, keepdim=True)
                target = (target - mean) / (var + NORM_PIX_EPS).sqrt()
            per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, L)
            mask = mask.float()
            # clamp: with mask_ratio=0 nothing is masked and the loss is 0, not NaN.
            return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward_loss(
        self, s1: Optional[Tensor], s2: Optional[Tensor], preds: dict[str, Tensor], masks: list[Masking]
    ) -> FusMAEOutput:
        """Per-modality predictions, masks and losses from the per-stream ones."""
        cfg = self.cfg
        if cfg.fusion == "stack":
            # One stream, one mask; the head's output is [p*p*C1 | p*p*C2].
            pred = preds["stack"]
            split = cfg.patch_size**2 * cfg.s1_channels
            per_modality = {"s1": (pred[..., :split], masks[0].mask), "s2": (pred[..., split:], masks[0].mask)}
        else:
            per_modality = {s: (preds[s], m.mask) for s, m in zip(self.streams, masks)}
        images = {"s1": s1, "s2": s2}
        losses = {s: self.reconstruction_loss(images[s], pred, mask) for s, (pred, mask) in per_modality.items()}
        if len(losses) == 2:
            loss = cfg.loss_weight_s1 * losses["s1"] + cfg.loss_weight_s2 * losses["s2"]
        else:
            # Single modality: weighting the only term would just rescale the learning rate.
            (loss,) = losses.values()
        out = FusMAEOutput(loss=loss)
        for s, (pred, mask) in per_modality.items():
            setattr(out, f"loss_{s}", losses[s])
            setattr(out, f"mask_{s}", mask)
            setattr(out, f"pred_{s}", pred)
        return out

    # ------------------------------------------------------------ public API
    def forward(
        self,
        s1: Optional[Tensor] = None,
        s2: Optional[Tensor] = None,
        *,
        mask_ratio: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        noise: Optional[Tensor] = None,
    ) -> FusMAEOutput:
        """Pre-training step: mask, encode, decode, reconstruction loss.

        s1: (B, s1_channels, H, W) Sentinel-1 (VV, VH); s2: (B, s2_channels, H, W)
        Sentinel-2; either may be None when cfg.fusion does not use it.
        mask_ratio overrides cfg.mask_ratio; generator (on the input device) seeds the
        masking; noise replaces it ((B, L), or (2, B, L) for independent masking of
        two streams; see :func:`model.masking.draw_masks`).
        """
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
        images = self._stream_images(s1, s2)
        tokens, grid = self._embed(images)  # {stream: (B, L, D)}
        B, L, _ = next(iter(tokens.values())).shape
        masks = draw_masks(
            self.cfg.masking, len(self.streams), B, L, ratio, device=tokens[self.streams[0]].device,
            generator=generator, noise=noise,
        )
        latent, lengths = self.forward_encoder(tokens, masks)  # (B, 1 + sum K, D)
        preds = self.forward_decoder(latent, lengths, masks, grid)  # {stream: (B, L, p*p*C)}
        return self.forward_loss(s1, s2, preds, masks)

    def forward_features(self, s1: Optional[Tensor] = None, s2: Optional[Tensor] = None) -> Tensor:
        """Normed encoder tokens without masking: (B, 1 + L_total, D), CLS first, then
        each stream's L tokens in grid order (S1 before S2). L_total = 2L for xattn and
        concat, L otherwise."""
        tokens, _ = self._embed(self._stream_images(s1, s2))
        x, _ = self.forward_encoder(tokens, masks=None)
        return x

    def encode(self, s1: Optional[Tensor] = None, s2: Optional[Tensor] = None) -> Tensor:
        """Pooled features (B, D) without masking: the mean of all patch tokens of both
        modalities (cfg.pool="mean") or the CLS token (cfg.pool="cls")."""
        x = self.forward_features(s1, s2)
        return x[:, 0] if self.cfg.pool == "cls" else x[:, 1:].mean(dim=1)

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """State dict of the encoder only: patch embeddings, modality / CLS tokens, blocks, norm."""
        return {k: v for k, v in self.state_dict().items() if _is_encoder_key(k)}

    def load_encoder_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True) -> EncoderLoadResult:
        """Load an :meth:`encoder_state_dict`; with strict, missing encoder keys or any
        other key (decoder ones included) raise RuntimeError."""
        encoder = {k: v for k, v in state_dict.items() if _is_encoder_key(k)}
        result = self.load_state_dict(encoder, strict=False)
        missing = [k for k in result.missing_keys if _is_encoder_key(k)]
        unexpected = list(result.unexpected_keys) + [k for k in state_dict if not _is_encoder_key(k)]
        if strict and (missing or unexpected):
            raise RuntimeError(f"encoder state dict mismatch: missing {missing}, unexpected {unexpected}")
        return EncoderLoadResult(missing, unexpected)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: tokens, norm weights, biases."""
        return {name for name, param in self.named_parameters() if param.ndim <= 1 or _is_token(name)}


def _is_encoder_key(key: str) -> bool:
    return not key.startswith("decoder")


def _is_token(name: str) -> bool:
    """Learned embeddings added to tokens (cls, mask and modality tokens)."""
    return name.endswith("token") or "modality_embed" in name


def _init_module(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
