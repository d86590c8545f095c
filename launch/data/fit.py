"""Does a network fit a shard set? The one check both pretraining and evaluation run before any work."""

from __future__ import annotations

from typing import Optional

from launch.config import ConfigError
from model import FusMAEConfig
from pipeline.manifest import Manifest


def check_model_fits(model_cfg: FusMAEConfig, manifest: Manifest, source: str,
                     image_size: Optional[int] = None) -> None:
    """The shards hold the bands the network was built for (for the modalities its fusion uses), and
    samples of at least ``image_size`` pixels when given. ``source`` names where the model config came
    from in the error (``model.*``, a checkpoint)."""
    for key, mod, used in (("s1_channels", "s1", model_cfg.uses_s1), ("s2_channels", "s2", model_cfg.uses_s2)):
        have, want = len(manifest.bands(mod)), getattr(model_cfg, key)
        if used and want != have:
            raise ConfigError(f"model.{key}={want} (from {source}) but the {manifest.split or 'data'} shards "
                              f"{manifest.shown} hold {have} {mod.upper()} bands {manifest.bands(mod)}")
    if image_size is not None and image_size > min(manifest.image_size):
        raise ConfigError(f"data.image_size={image_size} is larger than the shards' images {manifest.image_size} "
                          f"of {manifest.shown}")
