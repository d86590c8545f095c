"""Fus-MAE network: masked autoencoding of Sentinel-1 + Sentinel-2 with cross-attention fusion."""

from .config import FusMAEConfig
from .embed import patchify, unpatchify
from .fusmae import FusMAE, FusMAEOutput

__all__ = ["FusMAE", "FusMAEConfig", "FusMAEOutput", "patchify", "unpatchify"]
