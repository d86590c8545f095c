"""The exported encoder as a TerraTorch backbone, registered by name.

TerraTorch's documented contract for a custom backbone (``TERRATORCH_BACKBONE_REGISTRY.register`` on a
constructor; the name is the function's): an ``out_channels`` list with the width of each output, and a
``forward`` that returns a list of per-layer features. Here the outputs are the encoder's per-block
patch-token maps (B, D, h, w), so TerraTorch's decoders (``IdentityDecoder`` + its classification head,
``FCNDecoder``, ``UperNetDecoder``, ...) take them without a neck. Like TerraTorch's multimodal backbones
the input is a dict of modality tensors (``{"s1": ..., "s2": ...}``, or as keyword arguments); TerraMind's
modality names (``S1GRD``, ``S1RTC``, ``S2L1C``, ``S2L2A``) are accepted too.

In a task's ``model_args``::

    backbone: fusmae                            # the architecture from the export; or fusmae_vit_b, ... to check it
    backbone_pretrained: runs/vit_b/ckpt/encoder  # a Hub-format folder (or a Hub id); false: random initialisation
    backbone_normalized_inputs: false          # raw inputs (dB, reflectance x 10000), normalised by the export's stats
    backbone_out_indices: [3, 5, 7, 11]          # optional: the blocks whose maps are returned (default: all)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from terratorch.registry import TERRATORCH_BACKBONE_REGISTRY
from torch import Tensor, nn

from model import FusMAEConfig, FusMAEEncoder
from model.config import ENCODER_PRESETS
from model.hub import FORMAT, FORMAT_VERSION

ALIASES = {"s1": "s1", "S1GRD": "s1", "S1RTC": "s1", "s2": "s2", "S2L1C": "s2", "S2L2A": "s2"}
"""Input modality names → the encoder's (TerraMind's names included)."""


class FusMAEBackbone(nn.Module):
    """A `FusMAEEncoder` with TerraTorch's backbone interface: a dict of modalities in, a list of maps out."""

    def __init__(self, encoder: FusMAEEncoder, normalized_inputs: bool = False,
                 out_indices: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.normalized_inputs = normalized_inputs
        depth = encoder.num_layers
        self.out_indices = [i % depth for i in (range(depth) if out_indices is None else out_indices)]
        self.out_channels = [encoder.cfg.embed_dim] * len(self.out_indices)
        self.patch_size = encoder.cfg.patch_size  # TerraTorch pads inputs to a multiple of it

    def forward(self, x: Union[dict[str, Tensor], Tensor, None] = None, **modalities: Tensor) -> list[Tensor]:
        """x: {"s1": (B, 2, H, W), "s2": (B, C, H, W)} (or the modalities as keyword arguments; a plain
        tensor is the one modality of a single-modality encoder) → [(B, D, H/p, W/p)] per selected block."""
        inputs = self._inputs(x, modalities)
        out = self.encoder(inputs.get("s1"), inputs.get("s2"), normalized=self.normalized_inputs,
                           return_maps=True)
        return [out.maps[i] for i in self.out_indices]

    def _inputs(self, x: Union[dict[str, Tensor], Tensor, None], extra: dict[str, Tensor]) -> dict[str, Tensor]:
        if isinstance(x, Tensor):
            cfg = self.encoder.cfg
            if cfg.uses_s1 and cfg.uses_s2:
                raise ValueError("this encoder fuses S1 and S2: pass a dict {'s1': ..., 's2': ...}")
            x = {"s1" if cfg.uses_s1 else "s2": x}
        given = {**(x or {}), **extra}
        unknown = sorted(set(given) - set(ALIASES))
        if unknown:
            raise ValueError(f"unknown input modalities {unknown}; expected some of {sorted(ALIASES)}")
        return {ALIASES[k]: v for k, v in given.items()}


def build(size: Optional[str], pretrained: Union[str, bool, None] = False, ckpt_path: Optional[str] = None,
          normalized_inputs: bool = False, out_indices: Optional[Sequence[int]] = None,
          **model_fields: Any) -> FusMAEBackbone:
    """The backbone from an exported folder (``pretrained``: its path or Hub id; ``pretrained: true`` with
    ``ckpt_path``, TerraTorch's usual pair) or, with ``pretrained: false``, a random initialisation of the
    preset ``size`` (``model_fields``: FusMAEConfig fields such as s2_channels, patch_size, fusion)."""
    name = f"fusmae_{size}" if size else "fusmae"
    if pretrained is True and not ckpt_path:
        raise ValueError(f"{name}: pretrained=true needs ckpt_path (an exported folder); there are no default weights")
    source = pretrained if isinstance(pretrained, str) and pretrained else ckpt_path
    if source:
        if model_fields:
            raise ValueError(f"{name}: {sorted(model_fields)} come from the exported config; drop them")
        encoder = FusMAEEncoder.from_pretrained(str(source)).train()  # from_pretrained leaves it in eval mode
        if size and encoder.cfg.size != size:
            raise ValueError(f"{name}: {source} holds a {encoder.cfg.size} encoder; use fusmae_{encoder.cfg.size} "
                             "or fusmae")
    else:
        if not size:
            raise ValueError("fusmae: the architecture comes from `pretrained`; for a random initialisation "
                             f"name a preset: {', '.join('fusmae_' + s for s in ENCODER_PRESETS)}")
        cfg = FusMAEConfig.preset(size, **model_fields)
        encoder = FusMAEEncoder({"format": FORMAT, "format_version": FORMAT_VERSION, "model": cfg.to_dict()})
    return FusMAEBackbone(encoder, normalized_inputs, out_indices)


@TERRATORCH_BACKBONE_REGISTRY.register
def fusmae(pretrained: Union[str, bool, None] = None, **kwargs: Any) -> FusMAEBackbone:
    """A Fus-MAE encoder of any size, the architecture from the export ``pretrained`` names."""
    return build(None, pretrained, **kwargs)


@TERRATORCH_BACKBONE_REGISTRY.register
def fusmae_tiny(pretrained: Union[str, bool, None] = False, **kwargs: Any) -> FusMAEBackbone:
    return build("tiny", pretrained, **kwargs)


@TERRATORCH_BACKBONE_REGISTRY.register
def fusmae_vit_s(pretrained: Union[str, bool, None] = False, **kwargs: Any) -> FusMAEBackbone:
    return build("vit_s", pretrained, **kwargs)


@TERRATORCH_BACKBONE_REGISTRY.register
def fusmae_vit_b(pretrained: Union[str, bool, None] = False, **kwargs: Any) -> FusMAEBackbone:
    return build("vit_b", pretrained, **kwargs)


@TERRATORCH_BACKBONE_REGISTRY.register
def fusmae_vit_l(pretrained: Union[str, bool, None] = False, **kwargs: Any) -> FusMAEBackbone:
    return build("vit_l", pretrained, **kwargs)

