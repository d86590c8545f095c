"""Fus-MAE network: masked autoencoding of Sentinel-1 + Sentinel-2 with cross-attention fusion."""

from typing import Any

from .config import FusMAEConfig
from .embed import patchify, unpatchify
from .fusmae import FusMAE, FusMAEOutput

__all__ = ["EncoderOutput", "FusMAE", "FusMAEConfig", "FusMAEEncoder", "FusMAEOutput", "patchify", "unpatchify"]
_HUB = ("EncoderOutput", "FusMAEEncoder")


def __getattr__(name: str) -> Any:
    """`FusMAEEncoder` (model.hub) on first use: it needs huggingface_hub, which training and the pipeline do not."""
    if name in _HUB:
        from . import hub

        return getattr(hub, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
