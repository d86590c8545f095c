"""Does a network fit a shard set? The checks pretraining and evaluation run before any work, and the
network's input bands taken from the shards' manifest where the config leaves them open."""

from __future__ import annotations

from typing import Optional

from launch.config import ConfigError
from model import FusMAEConfig
from pipeline.manifest import Manifest


def derive_bands(model_cfg: FusMAEConfig, manifest: Manifest, source: str) -> FusMAEConfig:
    """Fill ``model.s1/s2_channels`` and ``model.s1/s2_bands`` from the manifest where they are None (in
    place, and returned). A value that is set must agree with the shards: a ConfigError names both."""
    for mod in ("s1", "s2"):
        names = list(manifest.bands(mod))
        count, bands = getattr(model_cfg, f"{mod}_channels"), getattr(model_cfg, f"{mod}_bands")
        where = f"the {manifest.split or 'data'} shards {manifest.shown}"
        if bands is not None and bands != names:
            raise ConfigError(f"model.{mod}_bands={bands} (from {source}) but {where} hold {names}; "
                              f"leave model.{mod}_bands unset to take the shards' bands")
        if count is not None and count != len(names):
            raise ConfigError(f"model.{mod}_channels={count} (from {source}) but {where} hold {len(names)} "
                              f"{mod.upper()} bands {names}; leave model.{mod}_channels unset (null) to take "
                              f"them from the manifest")
        setattr(model_cfg, f"{mod}_channels", len(names))
        setattr(model_cfg, f"{mod}_bands", names)
    model_cfg.validate()
    return model_cfg


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
