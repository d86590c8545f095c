"""The ground under a synthetic location, and how both sensors see it.

A land-cover map (smooth random blobs over :data:`LAND_COVER_CLASSES`) with a
smooth within-class texture. Each class has a Sentinel-2 spectrum that follows
the seasons and a Sentinel-1 backscatter with multiplicative speckle, so a model
has something to learn and labels can be read back from the pixels.

Everything here is drawn from generators made by :func:`keyed_rng`: one stream per
purpose, keyed by the archive seed and the location, so that the same arguments
give the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.synthetic.published import S2_L1C_BANDS, S2_L2A_BANDS, S2_RESOLUTION_M

# --- random streams ----------------------------------------------------------------------------

# Separate streams per purpose, so that adding a draw to one never shifts another.
STREAM_SCENE, STREAM_S2, STREAM_S1, STREAM_META, STREAM_ARCHIVE = range(5)


def keyed_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``keys`` (non-negative ints)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, keys)]))


# --- land cover and its signatures -------------------------------------------------------------

LAND_COVER_CLASSES = ("water", "forest", "cropland", "urban", "grassland", "bare")
WATER, FOREST, CROPLAND, URBAN, GRASSLAND, BARE = range(len(LAND_COVER_CLASSES))

SEASONS = ("spring", "summer", "autumn", "winter")  # time index order of the 4-season archives

# Surface reflectance x 10000 per class and L1C band (B10 is a placeholder: the surface is
# invisible at 1375 nm; it is filled in for L1C only). Two states per class: "green" at the
# peak of the growing season and "dormant" in winter; the seasons interpolate between them.
_SR_GREEN = np.array([
    # B1    B2    B3    B4    B5    B6    B7    B8   B8A    B9  B10   B11   B12
    [350,  450,  550,  350,  300,  250,  230,  200,  180,   60,   0,   80,   60],  # water
    [250,  300,  500,  280,  800, 2300, 2900, 3100, 3300, 1100,   0, 1600,  750],  # forest
    [300,  380,  750,  400, 1100, 2900, 3600, 3900, 4100, 1300,   0, 2100, 1050],  # cropland
    [1100, 1150, 1200, 1250, 1350, 1450, 1550, 1650, 1700, 650,   0, 2000, 1800],  # urban
    [350,  450,  800,  600, 1200, 2300, 2700, 2900, 3050, 1000,   0, 2300, 1400],  # grassland
    [1200, 1400, 1750, 2150, 2350, 2500, 2600, 2700, 2850, 1050,  0, 3400, 2900],  # bare
], dtype=np.float32)
_SR_DORMANT = _SR_GREEN.copy()
_SR_DORMANT[FOREST] = [280, 320, 480, 380, 700, 1500, 1800, 2000, 2100, 750, 0, 1500, 800]  # leaf-off
_SR_DORMANT[CROPLAND] = [900, 1000, 1250, 1500, 1700, 1850, 1950, 2050, 2150, 800, 0, 2800, 2300]  # ploughed
_SR_DORMANT[GRASSLAND] = [500, 600, 850, 850, 1100, 1500, 1700, 1800, 1900, 700, 0, 2400, 1700]
# Greenness per class and season (spring, summer, autumn, winter): 1 = _SR_GREEN, 0 = _SR_DORMANT.
_GREENNESS = np.array([
    [1.0, 1.0, 1.0, 1.0],  # water
    [0.7, 1.0, 0.6, 0.0],  # forest
    [0.5, 1.0, 0.3, 0.0],  # cropland
    [1.0, 1.0, 1.0, 1.0],  # urban
    [0.7, 1.0, 0.6, 0.1],  # grassland
    [1.0, 1.0, 1.0, 1.0],  # bare
], dtype=np.float32)
# Top-of-atmosphere minus surface reflectance (x 10000) for a standard aerosol load: the
# path radiance that makes L1C brighter than L2A, mostly in the blue.
_HAZE = np.array([900, 650, 400, 250, 200, 150, 120, 100, 90, 50, 0, 30, 20], dtype=np.float32)

# Sentinel-1 VV backscatter in dB per class, green and dormant state, and the VV - VH gap in dB
# (volume scattering in vegetation narrows it; double bounce in towns widens it).
_VV_GREEN = np.array([-22.0, -7.5, -10.0, 0.0, -12.0, -14.0], dtype=np.float32)
_VV_DORMANT = np.array([-22.0, -8.5, -14.0, 0.0, -13.0, -14.0], dtype=np.float32)
_VV_MINUS_VH = np.array([7.0, 6.0, 6.5, 8.0, 7.0, 8.0], dtype=np.float32)
# Within-class texture amplitude in dB (towns are bright and patchy).
_S1_TEXTURE_DB = np.array([0.3, 1.0, 1.0, 3.0, 0.8, 0.8], dtype=np.float32)
_S1_LOOKS = 5.0  # equivalent number of looks of IW GRDH: sets the speckle strength
_S1_NESZ_DB = -24.0  # noise-equivalent sigma0: the floor that dark water sits on in VH
_S1_DB_RANGE = (-50.0, 30.0)


# --- scene synthesis ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """What the ground looks like at one location; both modalities are rendered from it.

    ``classes``: (H, W) uint8 index into :data:`LAND_COVER_CLASSES`.
    ``texture``: (H, W) float32, smooth within-class variation, roughly N(0, 1).
    ``margin``: pixels on each side beyond the nominal footprint, so that a shifted
    (misaligned) S1 footprint still shows real ground.
    """

    classes: np.ndarray
    texture: np.ndarray
    margin: int

    def crop(self, size: int, dx: int = 0) -> "Scene":
        """The nominal size x size footprint, shifted by ``dx`` pixels to the east."""
        m = self.margin
        sl = (slice(m, m + size), slice(m + dx, m + dx + size))
        return Scene(self.classes[sl], self.texture[sl], 0)


def _smooth_noise(rng: np.random.Generator, n: int, shape: tuple[int, int], cell_px: float) -> np.ndarray:
    """``n`` smooth random fields of ``shape``, float32 (n, H, W), std roughly 0.5-1.

    Value noise: a coarse Gaussian lattice every ``cell_px`` pixels, interpolated with a
    smoothstep that softens the lattice, plus one octave at half the cell size
    for ragged edges.
    """
    out = np.zeros((n, *shape), dtype=np.float32)
    for cell, amp in ((cell_px, 1.0), (cell_px / 2, 0.5)):
        gh, gw = int(shape[0] / cell) + 2, int(shape[1] / cell) + 2
        lattice = rng.standard_normal((n, gh, gw)).astype(np.float32)
        fy, iy = np.modf((np.arange(shape[0]) + 0.5) / cell)
        fx, ix = np.modf((np.arange(shape[1]) + 0.5) / cell)
        iy, ix = iy.astype(int), ix.astype(int)
        wy = (fy * fy * (3 - 2 * fy)).astype(np.float32)[:, None]
        wx = (fx * fx * (3 - 2 * fx)).astype(np.float32)[None, :]
        top = lattice[:, iy][:, :, ix] * (1 - wx) + lattice[:, iy][:, :, ix + 1] * wx
        bottom = lattice[:, iy + 1][:, :, ix] * (1 - wx) + lattice[:, iy + 1][:, :, ix + 1] * wx
        out += amp * (top * (1 - wy) + bottom * wy)
    return out


def draw_scene(rng: np.random.Generator, size: int, margin: int = 6,
               class_weights: Sequence[float] | None = None) -> Scene:
    """Land cover for one location: a few smooth blobs over :data:`LAND_COVER_CLASSES`.

    Each class gets a smooth random field; a pixel takes the class whose field plus a
    per-location bias is highest. The biases come from Dirichlet weights (or
    ``class_weights``), so locations differ in composition: some are mostly forest,
    some have a lake, some have no town at all.
    """
    k = len(LAND_COVER_CLASSES)
    full = size + 2 * margin
    cell = max(full / 4.0, 8.0)  # blobs about a quarter of the footprint across
    if class_weights is None:
        w = rng.dirichlet(np.full(k, 0.7))
    else:
        w = np.asarray(class_weights, dtype=np.float64)
        w = w / w.sum()
    bias = 0.8 * np.log(np.maximum(w, 1e-6)).astype(np.float32)
    fields = _smooth_noise(rng, k, (full, full), cell) + bias[:, None, None]
    classes = np.argmax(fields, axis=0).astype(np.uint8)
    texture = _smooth_noise(rng, 1, (full, full), max(full / 12.0, 4.0))[0]
    return Scene(classes, texture, margin)


def class_fractions(classes: np.ndarray) -> np.ndarray:
    """Fraction of pixels per land-cover class, float64 (K,)."""
    return np.bincount(classes.ravel(), minlength=len(LAND_COVER_CLASSES)) / classes.size


# --- rendering ---------------------------------------------------------------------------------


def render_s2(rng: np.random.Generator, scene: Scene, seasons: Sequence[int], level: str) -> np.ndarray:
    """Sentinel-2 reflectance x 10000 on the 10 m grid, float32 (T, B, H, W).

    ``seasons``: season index (into :data:`SEASONS`) of each time step.
    ``level``: "L1C" (13 bands, top of atmosphere: surface + haze, B10 cirrus) or
    "L2A" (12 bands, surface reflectance, no B10). Draw L1C and L2A of one acquisition
    from generators in the same state to get the same surface and sensor noise.
    All bands are still at 10 m here: :func:`to_native_resolution` coarsens them.
    """
    cls = scene.classes
    t = len(seasons)
    g = _GREENNESS[:, list(seasons)]  # (K, T)
    spectra = _SR_DORMANT[:, None, :] + g[:, :, None] * (_SR_GREEN - _SR_DORMANT)[:, None, :]  # (K, T, 13)
    # Water colour changes with sediment from place to place and date to date.
    spectra[WATER, :, :4] *= rng.uniform(0.8, 1.4, size=(t, 1)).astype(np.float32)
    surface = spectra[cls]  # (H, W, T, 13)
    surface = np.moveaxis(surface, (2, 3), (0, 1))  # (T, 13, H, W)
    surface = surface * (1.0 + 0.08 * scene.texture)[None, None]
    noise = rng.standard_normal(surface.shape, dtype=np.float32)
    surface = surface + noise * (0.01 * surface + 15.0)
    aerosol = rng.uniform(0.6, 1.4, size=t).astype(np.float32)  # haze load per date (L1C only)
    if level == "L2A":
        keep = [S2_L1C_BANDS.index(b) for b in S2_L2A_BANDS]
        return surface[:, keep]
    if level != "L1C":
        raise ValueError(f"level must be 'L1C' or 'L2A', got {level!r}")
    toa = surface + _HAZE[None, :, None, None] * aerosol[:, None, None, None]
    b10 = S2_L1C_BANDS.index("B10")
    # Cirrus band: water vapour hides the ground, a faint trace of NIR leaks through.
    toa[:, b10] = 12.0 + 0.004 * surface[:, S2_L1C_BANDS.index("B8")] + 2.0 * noise[:, b10]
    return toa


def render_s1(rng: np.random.Generator, scene: Scene, seasons: Sequence[int]) -> np.ndarray:
    """Sentinel-1 GRD backscatter in dB on the 10 m grid, float32 (T, 2, H, W), bands (VV, VH).

    Per class mean backscatter (seasonal for vegetation), within-class texture, wind on
    water that changes per date, additive thermal noise at the NESZ, and multiplicative
    speckle: intensity times Gamma(L, 1/L) with L looks, then converted to dB.
    """
    cls = scene.classes
    t = len(seasons)
    g = _GREENNESS[:, list(seasons)].T  # (T, K)
    vv = _VV_DORMANT[None] + g * (_VV_GREEN - _VV_DORMANT)[None]  # (T, K)
    vv = vv + rng.normal(0.0, 0.4, size=(t, 1)).astype(np.float32)  # per-date calibration / moisture
    wind = rng.normal(0.0, 1.5, size=t).astype(np.float32)
    vv[:, WATER] += wind
    vh = vv - _VV_MINUS_VH[None]
    mean_db = np.stack([vv, vh], axis=1)[:, :, cls]  # (T, 2, H, W)
    mean_db = mean_db + (_S1_TEXTURE_DB[cls] * scene.texture)[None, None]
    intensity = 10.0 ** (mean_db / 10.0) + 10.0 ** (_S1_NESZ_DB / 10.0)
    speckle = rng.gamma(_S1_LOOKS, 1.0 / _S1_LOOKS, size=intensity.shape).astype(np.float32)
    db = 10.0 * np.log10(intensity * speckle)
    return np.clip(db, *_S1_DB_RANGE).astype(np.float32)


# --- resolutions -------------------------------------------------------------------------------


def check_size(size: int) -> None:
    """Refuse a footprint that the 60 m bands cannot tile: ``size`` pixels at 10 m, a multiple of 6."""
    if size <= 0 or size % 6:
        raise ValueError(f"size must be a positive multiple of 6 (60 m bands are size/6 px), got {size}")


def block_mean(a: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping factor x factor blocks of the last two axes: (..., H, W) -> (..., H/f, W/f)."""
    if factor == 1:
        return a
    h, w = a.shape[-2:]
    return a.reshape(*a.shape[:-2], h // factor, factor, w // factor, factor).mean(axis=(-3, -1))


def to_native_resolution(stack: np.ndarray, bands: Sequence[str]) -> list[np.ndarray]:
    """Per band, the 10 m field (..., H, W) of ``stack[..., b, :, :]`` coarsened to the band's GSD.

    Returns a list, one (..., H * 10 / GSD, W * 10 / GSD) array per band, as the sensor
    would record it: a 60 m pixel is the mean of the 6 x 6 10 m pixels it covers.
    """
    return [block_mean(stack[..., i, :, :], S2_RESOLUTION_M[b] // 10) for i, b in enumerate(bands)]


def resample_to_10m(stack: np.ndarray, bands: Sequence[str]) -> np.ndarray:
    """Coarsen each band to its GSD and repeat it back onto the 10 m grid (nearest neighbour).

    ``stack``: (..., B, H, W); returns the same shape, with 20 m and 60 m bands blocky, as
    in archives that resampled every band to 10 m.
    """
    out = np.empty_like(stack)
    for i, b in enumerate(bands):
        f = S2_RESOLUTION_M[b] // 10
        coarse = block_mean(stack[..., i, :, :], f)
        out[..., i, :, :] = np.repeat(np.repeat(coarse, f, axis=-2), f, axis=-1)
    return out
