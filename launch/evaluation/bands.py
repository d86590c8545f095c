"""Downstream bands onto the encoder's, by name: what lets a 13-band L1C encoder evaluate on 12-band
BigEarthNet, and a 12-band encoder on 13-band data.

For each band the encoder was pretrained on (in its order), `BandMap` takes the downstream band of
the same name; a band the downstream shards lack is filled with zero *after* normalisation, i.e.
with its mean: for an L1C encoder on BigEarthNet (L2A, no B10) that is the common practice of
filling B10 with its pretraining mean. Downstream bands the encoder does not know are dropped.

Encoders trained before band names were recorded (checkpoints, exports) hold counts only; those are
read as ESA's standard lists for their count (2: VV, VH; 13: L1C; 12: L2A) and the mapping says so.
An encoder and shards with less than half of the encoder's bands in common is an error: zeros in
most inputs are no evaluation of the encoder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

from launch.config import ConfigError
from model import FusMAEConfig
from pipeline.manifest import Manifest
from pipeline.sources.base import S1_BANDS, S2_L1C_BANDS, S2_L2A_BANDS

STANDARD_BANDS: dict[str, dict[int, tuple[str, ...]]] = {
    "s1": {len(S1_BANDS): S1_BANDS},
    "s2": {len(S2_L1C_BANDS): S2_L1C_BANDS, len(S2_L2A_BANDS): S2_L2A_BANDS},
}
"""The band lists an encoder with a count but no names is taken to have (pipeline.sources.base)."""
MIN_SHARED = 0.5
"""Fewer of the encoder's bands than this fraction present downstream is an error."""


def canonical(name: str) -> str:
    """One spelling per band: ``B01`` / ``b1`` -> ``B1``, ``B8a`` -> ``B8A``, ``vv`` -> ``VV``."""
    n = str(name).strip().upper()
    m = re.fullmatch(r"B0*(\d+)(A?)", n)
    return f"B{int(m.group(1))}{m.group(2)}" if m else n


@dataclass(frozen=True)
class BandMap:
    """One modality: ``take[i]`` is the downstream channel fed to encoder band ``i``, or None (filled)."""

    modality: str
    encoder: tuple[str, ...]
    data: tuple[str, ...]
    take: tuple[Optional[int], ...]
    assumed: bool = False
    """The encoder's band names were not recorded: `STANDARD_BANDS` for its count."""

    @property
    def identity(self) -> bool:
        return self.take == tuple(range(len(self.data)))

    @property
    def filled(self) -> list[str]:
        return [b for b, i in zip(self.encoder, self.take) if i is None]

    @property
    def dropped(self) -> list[str]:
        used = {i for i in self.take if i is not None}
        return [b for i, b in enumerate(self.data) if i not in used]

    def apply(self, x: Tensor) -> Tensor:
        """Normalised (B, len(data), H, W) -> (B, len(encoder), H, W); filled bands are zero (their mean)."""
        if self.identity:
            return x
        if x.shape[1] != len(self.data):
            raise ValueError(f"{self.modality}: expected {len(self.data)} bands {list(self.data)}, got {x.shape[1]}")
        out = x.new_zeros((x.shape[0], len(self.encoder), *x.shape[2:]))
        present = [(j, i) for j, i in enumerate(self.take) if i is not None]
        if present:
            dst, src = (list(t) for t in zip(*present))
            out[:, dst] = x[:, src]
        return out

    def describe(self) -> dict[str, Any]:
        return {"encoder": list(self.encoder), "data": list(self.data), "filled_with_mean": self.filled,
                "dropped": self.dropped, "encoder_names_assumed": self.assumed}

    def summary(self) -> str:
        if self.identity and not self.assumed:
            return f"{self.modality.upper()}: the encoder's {len(self.encoder)} bands, as they are"
        parts = [f"{self.modality.upper()}: {len(self.data)} data bands -> the encoder's {len(self.encoder)}"]
        if self.filled:
            parts.append(f"filled with their mean (0 after normalisation): {', '.join(self.filled)}")
        if self.dropped:
            parts.append(f"dropped (unknown to the encoder): {', '.join(self.dropped)}")
        if self.assumed:
            parts.append("the encoder records no band names: ESA's standard list for its count assumed")
        return "; ".join(parts)


def encoder_bands(model_cfg: FusMAEConfig, mod: str, source: str) -> tuple[list[str], bool]:
    """The encoder's band names of ``mod`` and whether they were assumed (none recorded)."""
    names = getattr(model_cfg, f"{mod}_bands")
    if names is not None:
        return [canonical(b) for b in names], False
    count = model_cfg.channels(mod)
    standard = STANDARD_BANDS[mod].get(count)
    if standard is None:
        raise ConfigError(f"{source}: its {count} {mod.upper()} input bands have no recorded names and no standard "
                          f"list has {count} (known: {sorted(STANDARD_BANDS[mod])}); bands cannot be matched")
    return list(standard), True


def band_map(model_cfg: FusMAEConfig, manifest: Manifest, mod: str, source: str) -> BandMap:
    """How ``manifest``'s bands of ``mod`` reach the encoder; a ConfigError when too few are shared."""
    enc, assumed = encoder_bands(model_cfg, mod, source)
    data = [canonical(b) for b in manifest.bands(mod)]
    where = {b: i for i, b in enumerate(data)}
    take = tuple(where.get(b) for b in enc)
    shared = sum(i is not None for i in take)
    if shared < MIN_SHARED * len(enc):
        raise ConfigError(f"{source}: its {mod.upper()} bands {enc} and the {manifest.split or 'data'} shards "
                          f"{manifest.shown} {mod.upper()} bands {data} have {shared} in common: too little to "
                          f"evaluate this encoder on them (at least {MIN_SHARED:.0%} of its bands are needed)")
    return BandMap(mod, tuple(enc), tuple(data), take, assumed)


def band_maps(model_cfg: FusMAEConfig, manifests: dict[str, Manifest], source: str) -> dict[str, BandMap]:
    """The mapping of each modality the encoder uses; every split must hold the same bands."""
    maps: dict[str, BandMap] = {}
    for mod in ("s1", "s2"):
        if not (model_cfg.uses_s1 if mod == "s1" else model_cfg.uses_s2):
            continue
        per_split = {split: band_map(model_cfg, m, mod, source) for split, m in manifests.items()}
        first = next(iter(per_split.values()))
        differ = {s: list(b.data) for s, b in per_split.items() if b.data != first.data}
        if differ:
            raise ConfigError(f"the splits hold different {mod.upper()} bands: "
                              + "; ".join(f"{s}: {list(b.data)}" for s, b in per_split.items()))
        maps[mod] = first
    return maps


def apply_maps(maps: dict[str, BandMap], s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    """Both modalities through their maps (a modality the encoder does not use passes unchanged)."""
    return (maps["s1"].apply(s1) if "s1" in maps else s1), (maps["s2"].apply(s2) if "s2" in maps else s2)


def describe(maps: dict[str, BandMap]) -> dict[str, Any]:
    return {mod: m.describe() for mod, m in maps.items()}


__all__ = ["BandMap", "MIN_SHARED", "STANDARD_BANDS", "apply_maps", "band_map", "band_maps", "canonical",
           "describe", "encoder_bands"]
