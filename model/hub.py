"""The pretrained encoder as the field uses it: `FusMAEEncoder`, loaded with ``from_pretrained``.

A Hub-format folder (written by `launch.training.export.export_pretrained`: at the end of training, or by
``python -m launch.export`` for any committed checkpoint) holds::

    model.safetensors   the encoder weights, float32, names as in `FusMAE.encoder_state_dict`
    config.json         format, model (the FusMAEConfig fields), data (band names in order, units, no-data,
                        normalisation statistics, the shard set), training (step, checkpoint), evaluation
    README.md           the model card, a rendering of config.json (`model.card.render_card`)

``FusMAEEncoder.from_pretrained(folder or hub id)`` (huggingface_hub's `PyTorchModelHubMixin`) rebuilds the
network from config.json and loads the weights strictly. ``forward(s1, s2)`` takes raw values (S1 backscatter
in dB, S2 reflectance x 10000, bands in config order) and normalises them exactly as pretraining did, or
values already normalised with ``normalized=True``; it returns the pooled vector and, on request, one
(B, D, h, w) patch-token map per encoder block (what dense decoders such as TerraTorch's take).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from torch import Tensor, nn

from .card import render_card
from .config import FusMAEConfig
from .fusmae import FusMAE

FORMAT = "fusmae-encoder"
FORMAT_VERSION = 1
MODALITIES = ("s1", "s2")
STD_FLOOR = 1e-6
"""A band with (near) zero spread is divided by this instead of its std (as in pretraining)."""


@dataclass
class EncoderOutput:
    """What `FusMAEEncoder.forward` returns."""

    pooled: Tensor
    """(B, D): mean of all patch tokens of every stream (config pool=mean) or the CLS token (pool=cls)."""
    maps: Optional[list[Tensor]] = None
    """With ``return_maps``: one (B, D, h, w) map per encoder block, h = H / patch, w = W / patch: the block's
    output tokens on the patch grid, averaged over the modality streams; the last one after the final norm."""


class Normalize(nn.Module):
    """Raw bands → the encoder's input, per band: ``(x - mean) / max(std, 1e-6)``, float32.

    Invalid pixels (non-finite, or equal to the modality's no-data value) are set to the band mean first, so
    they become 0. The same transform as pretraining's `launch.data.augment.DeviceAugment.normalise` (a test
    holds the two equal). x: (B, C, H, W) in the stored units, any dtype.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], nodata: Any = None) -> None:
        super().__init__()
        mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(list(std), dtype=torch.float32).clamp_min(STD_FLOOR).view(1, -1, 1, 1)
        # Not persistent: the statistics travel in config.json, so model.safetensors holds the weights only.
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("inv_std", 1.0 / std_t, persistent=False)
        self.nodata = nodata_value(nodata)

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected (B, {self.channels}, H, W) raw bands, got {tuple(x.shape)}")
        x = x.float()
        bad = ~torch.isfinite(x)
        if self.nodata is not None:
            bad = bad | (x == self.nodata)
        x = torch.where(bad, self.mean, x)
        return (x - self.mean) * self.inv_std


def nodata_value(value: Any) -> Optional[float]:
    """A manifest's no-data value as a number; None for 'non-finite' (caught by the finite check) or absent."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def model_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The FusMAEConfig fields of a config.json, after checking it is one of ours."""
    if config.get("format") != FORMAT:
        raise ValueError(f"not a Fus-MAE encoder config: format is {config.get('format')!r}, expected {FORMAT!r}")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"config format_version {config['format_version']} is newer than this code "
                         f"({FORMAT_VERSION}): update fusmae")
    known = set(FusMAEConfig.__dataclass_fields__)
    return {k: v for k, v in dict(config["model"]).items() if k in known}


class FusMAEEncoder(
    FusMAE,
    PyTorchModelHubMixin,
    library_name="fusmae",
    pipeline_tag="image-feature-extraction",
    tags=["earth-observation", "remote-sensing", "sentinel-1", "sentinel-2", "masked-autoencoder", "fus-mae"],
):
    """The Fus-MAE encoder of a pretraining run, without its decoder.

    ``config`` is the content of config.json (see the module docstring); ``from_pretrained`` passes it.
    The weights' names are those of `FusMAE.encoder_state_dict`, so the same file also loads into a
    `FusMAE` with ``load_encoder_state_dict``.
    """

    def __init__(self, config: Optional[dict] = None) -> None:
        if config is None:
            raise ValueError("no config.json: not a Hub-format Fus-MAE encoder folder (an older export, "
                             "encoder.safetensors + encoder_config.json, converts with "
                             "`python -m launch.export OLD_FOLDER NEW_FOLDER`)")
        super().__init__(FusMAEConfig(**model_fields(config)))
        for name, _ in list(self.named_children()):
            if name.startswith("decoder"):  # the decoder is pretraining's only
                setattr(self, name, None)
        self.config = dict(config)
        stats = (config.get("data") or {}).get("normalization") or {}
        nodata = (config.get("data") or {}).get("nodata") or {}
        self.normalizers = nn.ModuleDict({
            m: Normalize(stats[m]["mean"], stats[m]["std"], nodata.get(m)) for m in MODALITIES if m in stats
        })

    # ------------------------------------------------------------------ inputs
    def normalize(self, s1: Optional[Tensor], s2: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Raw (B, C, H, W) bands → normalised inputs, in the weights' dtype; None stays None."""
        dtype = next(self.parameters()).dtype
        out = []
        for m, x in (("s1", s1), ("s2", s2)):
            if x is None:
                out.append(None)
                continue
            if m not in self.normalizers:
                raise ValueError(f"config.json has no normalisation statistics for {m} (data.normalization); "
                                 "pass inputs normalised as in pretraining with normalized=True")
            out.append(self.normalizers[m](x).to(dtype))
        return out[0], out[1]

    # ------------------------------------------------------------------ stages
    def encode_layers(self, tokens: dict[str, Tensor], grid: tuple[int, int],
                      return_maps: bool) -> tuple[Tensor, Optional[list[Tensor]]]:
        """tokens {stream: (B, L, D)} → the normed sequence (B, 1 + sum L, D) exactly as
        `FusMAE.forward_encoder` without masking, and with ``return_maps`` one (B, D, h, w) map per block."""
        xs = [tokens[s] for s in self.streams]
        blocks = list(self.blocks)
        maps: list[Tensor] = []
        if self.cfg.fusion == "xattn":  # the cross-attention block works on the two streams, before the CLS
            xs = list(self._run(blocks.pop(0), *xs))
            if return_maps:
                maps.append(grid_map(xs, grid))
        cls = self.cls_token(xs[0].shape[0])  # (B, 1, D)
        dtype = xs[0].dtype
        lengths = [t.shape[1] for t in xs]
        x = torch.cat([cls.to(dtype), *(t.to(dtype) for t in xs)], dim=1)  # (B, 1 + sum L, D)
        for i, block in enumerate(blocks):
            x = self._run(block, x)
            if return_maps and i < len(blocks) - 1:
                maps.append(grid_map(x[:, 1:].split(lengths, dim=1), grid))
        x = self.norm(x)
        if return_maps:
            maps.append(grid_map(x[:, 1:].split(lengths, dim=1), grid))
        return x, (maps if return_maps else None)

    def forward(self, s1: Optional[Tensor] = None, s2: Optional[Tensor] = None, *, normalized: bool = False,
                return_maps: bool = False) -> EncoderOutput:  # type: ignore[override]
        """s1: (B, 2, H, W) VV, VH; s2: (B, C, H, W), bands in ``config["data"]["s2_bands"]`` order; H, W
        multiples of the patch size. Raw values (S1 dB, S2 reflectance x 10000; no-data and non-finite pixels
        allowed) unless ``normalized``; a modality the fusion mode does not use may be None."""
        if not normalized:
            s1, s2 = self.normalize(s1 if self.cfg.uses_s1 else None, s2 if self.cfg.uses_s2 else None)
        tokens, grid = self._embed(self._stream_images(s1, s2))  # {stream: (B, L, D)}, (h, w)
        x, maps = self.encode_layers(tokens, grid, return_maps)  # (B, 1 + sum L, D)
        pooled = x[:, 0] if self.cfg.pool == "cls" else x[:, 1:].mean(dim=1)  # (B, D), as FusMAE.encode
        return EncoderOutput(pooled, maps)

    @property
    def num_layers(self) -> int:
        """Maps ``forward(..., return_maps=True)`` returns: one per block."""
        return self.cfg.depth

    # ------------------------------------------------------------- the Hub mixin
    @classmethod
    def _load_as_safetensor(cls, model: "FusMAEEncoder", model_file: str, map_location: str,
                            strict: bool) -> "FusMAEEncoder":
        """Always strict (the mixin's default is not): a missing or unexpected tensor is an error."""
        from safetensors.torch import load_file

        model.load_encoder_state_dict(load_file(model_file, device=str(map_location)), strict=True)
        model.eval()
        return model

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The card ``save_pretrained`` / ``push_to_hub`` write: the same one the export writes."""
        return ModelCard(render_card(self.config))


def grid_map(streams: Sequence[Tensor], grid: tuple[int, int]) -> Tensor:
    """Per-stream tokens (B, L, D) in grid order → (B, D, h, w), the mean over the streams."""
    x = streams[0] if len(streams) == 1 else torch.stack(list(streams)).mean(dim=0)
    B, L, D = x.shape
    h, w = grid
    return x.transpose(1, 2).reshape(B, D, h, w)
