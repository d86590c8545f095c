"""Tests of the Fus-MAE network over a matrix of tiny configurations (CPU, seconds)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import model.fusmae as fusmae_module
from model import FusMAE, FusMAEConfig, FusMAEOutput, patchify, unpatchify
from model.config import DECODERS, FUSIONS, MASKINGS
from model.embed import sincos_pos_embed_2d
from model.flops import estimate_flops_per_sample
from model.masking import draw_masks

PATCH = 8
TWO_STREAMS = ("xattn", "concat")


def tiny(**overrides) -> FusMAEConfig:
    return FusMAEConfig.preset("tiny", img_size=32, patch_size=PATCH, **overrides)


def build(cfg: FusMAEConfig, seed: int = 0) -> FusMAE:
    torch.manual_seed(seed)
    return FusMAE(cfg)


def images(cfg: FusMAEConfig, B: int = 2, H: int = 32, W: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s1 = torch.randn(B, cfg.s1_channels, H, W, generator=g)
    s2 = torch.randn(B, cfg.s2_channels, H, W, generator=g)
    return s1, s2


def smooth_images(B: int = 8, H: int = 32, W: int = 32, seed: int = 0):
    """A per-sample, per-band offset plus a smooth wave: learnable from visible patches."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")

    def bands(C: int) -> torch.Tensor:
        offset = torch.randn(B, C, 1, 1, generator=g)
        freq = torch.rand(B, C, 1, 1, generator=g) * 6
        phase = torch.rand(B, C, 1, 1, generator=g) * 6
        return offset + torch.sin(freq * xx + phase) * torch.cos(freq * yy)

    return bands(2), bands(13)


def twin(net: FusMAE, **overrides) -> FusMAE:
    """A copy of net with the same weights and some config fields changed."""
    other = FusMAE(replace(net.cfg, **overrides))
    other.load_state_dict(net.state_dict())
    return other


ALL_COMBOS = list(itertools.product(FUSIONS, DECODERS, MASKINGS))
VALID_COMBOS = [c for c in ALL_COMBOS if not (c[1] == "xattn" and c[0] in ("stack", "s1", "s2"))]


# ---------------------------------------------------------------- shapes
@pytest.mark.parametrize("fusion,decoder,masking", ALL_COMBOS)
@pytest.mark.parametrize("H,W,s2_channels", [(32, 48, 13), (32, 32, 12)])
def test_output_shapes(fusion, decoder, masking, H, W, s2_channels):
    if (fusion, decoder, masking) not in VALID_COMBOS:
        with pytest.raises(ValueError, match="model.decoder"):
            tiny(fusion=fusion, decoder=decoder, masking=masking, s2_channels=s2_channels)
        return
    cfg = tiny(fusion=fusion, decoder=decoder, masking=masking, s2_channels=s2_channels)
    net = build(cfg)
    s1, s2 = images(cfg, B=3, H=H, W=W)
    B, L, D = 3, (H // PATCH) * (W // PATCH), cfg.embed_dim
    out = net(s1 if cfg.uses_s1 else None, s2 if cfg.uses_s2 else None)
    assert isinstance(out, FusMAEOutput)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    for name, used, C in (("s1", cfg.uses_s1, 2), ("s2", cfg.uses_s2, s2_channels)):
        fields = [getattr(out, f"{kind}_{name}") for kind in ("loss", "mask", "pred")]
        if not used:
            assert fields == [None, None, None]
            continue
        loss, mask, pred = fields
        assert loss.shape == () and loss.dtype == torch.float32
        assert mask.shape == (B, L) and mask.dtype == torch.float32
        assert pred.shape == (B, L, PATCH * PATCH * C)
        # The layout contract: pred_* can be unpatchified like the input.
        assert unpatchify(pred, PATCH, C, H // PATCH, W // PATCH).shape == (B, C, H, W)
    streams = 2 if fusion in TWO_STREAMS else 1
    assert net.forward_features(s1, s2).shape == (B, 1 + streams * L, D)
    assert net.encode(s1, s2).shape == (B, D)


@pytest.mark.parametrize("fusion", ["xattn", "concat", "stack", "s1", "s2"])
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_is_masked_mse_of_patchified_input(fusion, norm_pix_loss):
    """loss_s* equals the MSE between pred_s* and patchify(s*) over masked patches,
    which pins down the prediction layout (the stack split in particular)."""
    cfg = tiny(fusion=fusion, norm_pix_loss=norm_pix_loss, loss_weight_s1=0.3, loss_weight_s2=2.0)
    net = build(cfg)
    s1, s2 = images(cfg)
    out = net(s1, s2, generator=torch.Generator().manual_seed(1))
    expected = {}
    for name, img in (("s1", s1), ("s2", s2)):
        pred, mask = getattr(out, f"pred_{name}"), getattr(out, f"mask_{name}")
        if pred is None:
            continue
        target = patchify(img, PATCH)
        if norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        expected[name] = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
        torch.testing.assert_close(getattr(out, f"loss_{name}"), expected[name])
    total = 0.3 * expected["s1"] + 2.0 * expected["s2"] if len(expected) == 2 else next(iter(expected.values()))
    torch.testing.assert_close(out.loss, total)


# --------------------------------------------------------------- masking
# Visible patches of the 4 x 6 = 24-patch grid, worked out by hand from round(L * (1 - r)) (README, "exactly
# round(L·(1-r)) visible patches"): 24 * 1 = 24, 24 * 0.5 = 12, 24 * 0.25 = 6 (MAE's default ratio), 24 * 0.1 = 2.4
# -> 2, and 24 * 0.4 = 9.6 -> 10, where rounding differs from facebookresearch/mae's int() truncation (which gives 9).
@pytest.mark.parametrize("mask_ratio,visible", [(0.0, 24), (0.5, 12), (0.75, 6), (0.9, 2), (0.6, 10)])
@pytest.mark.parametrize(
    "fusion,masking", [("xattn", "consistent"), ("concat", "independent"), ("stack", "consistent")]
)
def test_visible_count_per_sample(mask_ratio, visible, fusion, masking):
    cfg = tiny(fusion=fusion, masking=masking)
    net = build(cfg)
    s1, s2 = images(cfg, B=4)  # grid 4 x 6 = 24 patches
    out = net(s1, s2, mask_ratio=mask_ratio, generator=torch.Generator().manual_seed(0))
    for mask in (out.mask_s1, out.mask_s2):
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert (mask.shape[1] - mask.sum(dim=1)).tolist() == [visible] * 4


def test_consistent_and_independent_masks():
    g = torch.Generator().manual_seed(0)
    consistent = draw_masks("consistent", 2, 4, 64, 0.75, torch.device("cpu"), generator=g)
    independent = draw_masks("independent", 2, 4, 64, 0.75, torch.device("cpu"), generator=g)
    assert torch.equal(consistent[0].mask, consistent[1].mask)
    assert torch.equal(consistent[0].ids_keep, consistent[1].ids_keep)
    assert not torch.equal(independent[0].mask, independent[1].mask)
    # Every row of the batch gets its own draw.
    assert not torch.equal(consistent[0].mask[0], consistent[0].mask[1])
    # ids_restore inverts the shuffle: kept ids are exactly the unmasked positions.
    m = consistent[0]
    assert torch.equal(torch.zeros_like(m.mask).scatter(1, m.ids_keep, 1.0), 1 - m.mask)

    for masking, same in (("consistent", True), ("independent", False)):
        for fusion in TWO_STREAMS:
            cfg = tiny(fusion=fusion, masking=masking)
            out = build(cfg)(*images(cfg, B=4), generator=torch.Generator().manual_seed(0))
            assert torch.equal(out.mask_s1, out.mask_s2) == same


def test_masking_noise_and_generator_are_deterministic():
    cfg = tiny(masking="independent")
    net = build(cfg)
    s1, s2 = images(cfg)
    a = net(s1, s2, generator=torch.Generator().manual_seed(5))
    b = net(s1, s2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.mask_s1, b.mask_s1) and torch.equal(a.loss, b.loss)
    noise = torch.rand(2, 2, 24, generator=torch.Generator().manual_seed(0))
    c = net(s1, s2, noise=noise)
    assert torch.equal(c.mask_s1, draw_masks("consistent", 1, 2, 24, 0.75, torch.device("cpu"), noise=noise[0])[0].mask)
    with pytest.raises(ValueError, match="noise"):
        net(s1, s2, noise=noise[0])  # independent masking of two streams needs (2, B, L)


# ------------------------------------------------------------ SDPA/eager
@pytest.mark.parametrize("fusion,decoder", [("xattn", "separate"), ("xattn", "xattn"), ("concat", "separate"),
                                            ("concat", "xattn"), ("stack", "separate")])
def test_sdpa_matches_eager(fusion, decoder):
    fused = build(tiny(fusion=fusion, decoder=decoder, fused_attn=True))
    eager = twin(fused, fused_attn=False)
    s1, s2 = images(fused.cfg)
    a = fused(s1, s2, generator=torch.Generator().manual_seed(3))
    b = eager(s1, s2, generator=torch.Generator().manual_seed(3))
    tol = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.loss, b.loss, **tol)
    torch.testing.assert_close(a.pred_s1, b.pred_s1, **tol)
    torch.testing.assert_close(a.pred_s2, b.pred_s2, **tol)
    torch.testing.assert_close(fused.encode(s1, s2), eager.encode(s1, s2), **tol)


# ------------------------------------------------------- information flow
@pytest.mark.parametrize("fusion", ["xattn", "concat", "stack"])
def test_s2_loss_depends_on_s1(fusion):
    cfg = tiny(fusion=fusion)
    s1, s2 = images(cfg)
    s1.requires_grad_(True)
    build(cfg)(s1, s2).loss_s2.backward()
    assert s1.grad is not None and s1.grad.abs().sum() > 0


@pytest.mark.parametrize("fusion,absent", [("s2", "s1"), ("s1", "s2")])
def test_single_modality_ignores_the_other(fusion, absent):
    cfg = tiny(fusion=fusion)
    net = build(cfg)
    s1, s2 = images(cfg)
    inputs = {"s1": s1, "s2": s2}
    out_none = net(**{**inputs, absent: None}, generator=torch.Generator().manual_seed(0))
    inputs[absent].requires_grad_(True)
    out = net(**inputs, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert inputs[absent].grad is None
    torch.testing.assert_close(out.loss, out_none.loss)
    assert getattr(out, f"loss_{absent}") is None
    assert net.encode(**{**inputs, absent: None}).shape == (2, cfg.embed_dim)


def test_missing_or_mismatched_inputs_raise():
    cfg = tiny(fusion="xattn")
    net = build(cfg)
    s1, s2 = images(cfg)
    with pytest.raises(ValueError, match="s2"):
        net(s1, None)
    with pytest.raises(ValueError, match="divisible"):
        net(s1[..., :30], s2[..., :30])
    with pytest.raises(ValueError, match="share"):
        net(s1, s2[..., :40])
    with pytest.raises(ValueError, match="mask_ratio"):
        net(s1, s2, mask_ratio=1.0)


# ------------------------------------------------------------ parameters
@pytest.mark.parametrize("size,reference", [("vit_s", 22.0e6), ("vit_b", 86.6e6), ("vit_l", 304.3e6)])
def test_encoder_parameter_counts_match_vit(size, reference):
    # Meta tensors: shapes without memory, so ViT-L costs nothing to build.
    with torch.device("meta"):
        net = FusMAE(FusMAEConfig.preset(size, fusion="concat"))
    count = sum(p.numel() for name, p in net.named_parameters() if name.startswith(("blocks.", "patch_embed.")))
    # Ours has 2 + 13 input bands instead of RGB and no classifier head: a few percent.
    assert abs(count - reference) / reference < 0.05, (size, count)


def test_no_weight_decay_and_encoder_keys():
    net = build(tiny(fusion="xattn", decoder="xattn"))
    names = net.no_weight_decay()
    exempt = {
        "cls_token.token", "patch_embed.s1.modality_embed", "decoders.s2.mask_token", "norm.weight", "blocks.0.s1_from_s2.attn.q.bias"
    }
    assert exempt <= names
    assert "blocks.1.attn.qkv.weight" not in names and "patch_embed.s1.proj.weight" not in names
    enc = net.encoder_state_dict()
    assert enc and not any(k.startswith("decoder") for k in enc)
    assert {k.split(".")[0] for k in enc} == {"patch_embed", "cls_token", "blocks", "norm"}


# -------------------------------------------------------------- training
@pytest.mark.parametrize("fusion", ["xattn", "stack"])
def test_adamw_steps_reduce_loss(fusion):
    net = build(tiny(fusion=fusion))
    s1, s2 = smooth_images()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        loss = net(s1, s2, generator=g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses


@pytest.mark.parametrize("fusion,decoder", [("xattn", "xattn"), ("stack", "separate")])
def test_bf16_autocast(fusion, decoder):
    net = build(tiny(fusion=fusion, decoder=decoder))
    s1, s2 = images(net.cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(s1, s2)
        feats = net.encode(s1, s2)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert torch.isfinite(feats).all()


@pytest.mark.parametrize("fusion,decoder", [("xattn", "xattn"), ("concat", "separate")])
def test_grad_checkpointing_matches(fusion, decoder, monkeypatch):
    plain = build(tiny(fusion=fusion, decoder=decoder))
    ckpt = twin(plain, grad_checkpointing=True)
    calls = []

    def counting_checkpoint(block, *args, **kwargs):
        calls.append(type(block).__name__)
        return torch.utils.checkpoint.checkpoint(block, *args, **kwargs)

    monkeypatch.setattr(fusmae_module, "checkpoint", counting_checkpoint)
    s1, s2 = images(plain.cfg)
    losses = []
    for net in (plain, ckpt):
        net.train()
        out = net(s1, s2, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        losses.append(out.loss)
    # Every encoder and decoder block of the checkpointed model, none of the plain one.
    cfg = plain.cfg
    assert len(calls) == cfg.depth + 2 * cfg.decoder_depth - (1 if decoder == "xattn" else 0)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------- encode / round trips
@pytest.mark.parametrize("fusion,pool", [("xattn", "mean"), ("concat", "cls"), ("s1", "mean")])
def test_encode_is_deterministic_and_ignores_mask_ratio(fusion, pool):
    net = build(tiny(fusion=fusion, pool=pool, mask_ratio=0.75))
    other = twin(net, mask_ratio=0.1)
    s1, s2 = images(net.cfg)
    a = net.encode(s1, s2)
    net(s1, s2)  # a masked forward in between must not change anything
    torch.testing.assert_close(net.encode(s1, s2), a, atol=0, rtol=0)
    torch.testing.assert_close(other.encode(s1, s2), a, atol=0, rtol=0)
    tokens = net.forward_features(s1, s2)
    expected = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)
    torch.testing.assert_close(a, expected)


@pytest.mark.parametrize("C,H,W", [(2, 32, 48), (13, 16, 16)])
def test_patchify_round_trip_and_layout(C, H, W):
    x = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(0))
    patches = patchify(x, PATCH)
    h, w = H // PATCH, W // PATCH
    assert patches.shape == (2, h * w, PATCH * PATCH * C)
    assert torch.equal(unpatchify(patches, PATCH, C, h, w), x)
    # Documented order: patch (i, j) row-major; inside, (pixel row, pixel col, channel).
    i, j, r, c, ch = h - 1, w - 1, 3, 5, C - 1
    assert patches[1, i * w + j, (r * PATCH + c) * C + ch] == x[1, ch, i * PATCH + r, j * PATCH + c]


def test_sincos_pos_embed():
    emb = sincos_pos_embed_2d(16, 3, 5)
    assert emb.shape == (15, 16) and emb.dtype == torch.float32
    # First half encodes the column: tokens in the same column share it.
    torch.testing.assert_close(emb[0, :8], emb[5, :8])
    torch.testing.assert_close(emb[0, 8:], emb[1, 8:])
    assert len({tuple(row.tolist()) for row in emb}) == 15


@pytest.mark.parametrize("fusion", ["xattn", "stack", "s2"])
def test_encoder_state_dict_round_trip(fusion):
    src = build(tiny(fusion=fusion), seed=0)
    dst = build(tiny(fusion=fusion, decoder="separate"), seed=1)
    s1, s2 = images(src.cfg)
    assert not torch.allclose(src.encode(s1, s2), dst.encode(s1, s2))
    dst.load_encoder_state_dict(src.encoder_state_dict(), strict=True)
    torch.testing.assert_close(dst.encode(s1, s2), src.encode(s1, s2), atol=0, rtol=0)
    partial = dict(src.encoder_state_dict())
    partial.pop("cls_token.token")
    with pytest.raises(RuntimeError, match="cls_token"):
        dst.load_encoder_state_dict(partial, strict=True)
    assert dst.load_encoder_state_dict(partial, strict=False).missing_keys == ["cls_token.token"]


# ---------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(size="huge"), "model.size"),
        (dict(fusion="late"), "model.fusion"),
        (dict(img_size=100, patch_size=16), "model.img_size"),
        (dict(masking="checkerboard"), "model.masking"),
        (dict(fusion="stack", decoder="xattn"), "model.decoder"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    size = kwargs.pop("size", "tiny")
    with pytest.raises(ValueError, match=key):
        FusMAEConfig.preset(size, **kwargs)


# ----------------------------------------------------------------- FLOPs
@pytest.mark.parametrize(
    "fusion,decoder", [("xattn", "separate"), ("concat", "xattn"), ("stack", "separate"), ("s2", "separate")]
)
def test_flops_estimate_matches_counter(fusion, decoder):
    # Eager attention: the counter sees the attention matmuls as plain bmm calls.
    cfg = tiny(fusion=fusion, decoder=decoder, fused_attn=False)
    net = build(cfg)
    s1, s2 = images(cfg, B=2, H=32, W=48)
    counter = FlopCounterMode(display=False)
    with counter:
        net(s1, s2).loss.backward()
    measured = counter.get_total_flops() / 2
    assert measured == pytest.approx(estimate_flops_per_sample(cfg, (32, 48)), rel=1e-3)
    assert estimate_flops_per_sample(cfg, 64) > estimate_flops_per_sample(cfg, 32)


@pytest.mark.parametrize("fusion", ["xattn", "stack"])
def test_bf16_weights_and_inputs_stay_bf16(fusion):
    """DeepSpeed's bf16 mode casts the parameters themselves (no autocast): nothing may promote to float32."""
    torch.manual_seed(0)
    cfg = FusMAEConfig.preset("tiny", fusion=fusion, patch_size=8, img_size=32)
    net = FusMAE(cfg).to(torch.bfloat16)
    s1 = torch.randn(2, 2, 32, 32, dtype=torch.bfloat16)
    s2 = torch.randn(2, 13, 32, 32, dtype=torch.bfloat16)
    out = net(s1, s2)
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    out.loss.backward()
    assert net.encode(s1, s2).dtype == torch.bfloat16
