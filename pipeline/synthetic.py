"""Small, realistic Sentinel-1/Sentinel-2 archives in the published file layouts.

Three writers, one per layout the pipeline reads:

* :func:`make_ssl4eo_zarr`: SSL4EO-S12 v1.1, zipped Zarr v2 stores of 4-season cubes.
* :func:`make_ssl4eo_tiff`: SSL4EO-S12 v1, one GeoTIFF per band, season and modality.
* :func:`make_bigearthnet`: BigEarthNet v2 (reBEN), GeoTIFF patches plus ``metadata.parquet``.

Every location gets a land-cover map (smooth random blobs over
:data:`LAND_COVER_CLASSES`) that drives both modalities: each class has a
Sentinel-2 spectrum that follows the seasons and a Sentinel-1 backscatter
(with multiplicative speckle), so a model has something to learn and
BigEarthNet labels can be read back from the pixels.

Everything is a pure function of ``seed`` and the location id: the same
arguments give byte-identical files (the zip entries carry a fixed date).

Command line::

    python -m pipeline.synthetic ssl4eo-zarr OUTDIR [--n N] [--size S] [--seed K]
"""

from __future__ import annotations

import argparse
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.warp import transform as warp_transform

# --- band tables -------------------------------------------------------------------------------

# The band tables and the label nomenclature are the readers' own: one definition of the layout.
from pipeline.sources.base import S1_BANDS, S2_L1C_BANDS, S2_L2A_BANDS, S2_RESOLUTION_M  # noqa: E402
from pipeline.sources.bigearthnet import BIGEARTHNET_19_CLASSES  # noqa: E402

# BigEarthNet spells the same L2A bands with two digits.
BIGEARTHNET_S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


# --- land cover --------------------------------------------------------------------------------

LAND_COVER_CLASSES = ("water", "forest", "cropland", "urban", "grassland", "bare")
WATER, FOREST, CROPLAND, URBAN, GRASSLAND, BARE = range(len(LAND_COVER_CLASSES))

# One BigEarthNet-19 label per class, so that a label is exactly "this class covers enough pixels".
BIGEARTHNET_LABEL_OF_CLASS = {
    "water": "Inland waters",
    "forest": "Mixed forest",
    "cropland": "Arable land",
    "urban": "Urban fabric",
    "grassland": "Pastures",
    "bare": "Natural grassland and sparsely vegetated areas",
}
# A class covering at least this fraction of a patch gets its label.
LABEL_MIN_FRACTION = 0.05

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
S2_ZARR_OFFSET = 1000  # SSL4EO-S12 v1.1 stores reflectance x 10000 + 1000; 0 stays no-data


# --- random streams ----------------------------------------------------------------------------

# Separate streams per purpose, so that adding a draw to one never shifts another.
_STREAM_SCENE, _STREAM_S2, _STREAM_S1, _STREAM_META, _STREAM_ARCHIVE = range(5)
# BigEarthNet patches draw from their own key space; SSL4EO zarr and tiff share one, so a
# location id shows the same ground in both SSL4EO layouts.
_BEN_KEY = 1


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``keys`` (non-negative ints)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, keys)]))


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


def class_fractions(classes: np.ndarray) -> np.ndarray:
    """Fraction of pixels per land-cover class, float64 (K,)."""
    return np.bincount(classes.ravel(), minlength=len(LAND_COVER_CLASSES)) / classes.size


def bigearthnet_labels(classes: np.ndarray) -> list[str]:
    """BigEarthNet-19 labels of a class map, in nomenclature order (classes above LABEL_MIN_FRACTION)."""
    frac = class_fractions(classes)
    present = {BIGEARTHNET_LABEL_OF_CLASS[c] for c, f in zip(LAND_COVER_CLASSES, frac) if f >= LABEL_MIN_FRACTION}
    return [name for name in BIGEARTHNET_19_CLASSES if name in present]


# --- geography and product names ---------------------------------------------------------------


def utm_epsg(lat: float, lon: float) -> int:
    """EPSG code of the WGS 84 / UTM zone holding (lat, lon): 326zz north, 327zz south."""
    zone = int((lon + 180.0) // 6.0) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


def _latitude_band(lat: float) -> str:
    return "CDEFGHJKLMNPQRSTUVWX"[min(max(int((lat + 80) // 8), 0), 19)]


def _mgrs_tile(rng: np.random.Generator, lat: float, lon: float) -> str:
    """A plausible MGRS tile name ("32TMT") for the point; the 100 km square letters are drawn."""
    zone = int((lon + 180.0) // 6.0) % 60 + 1
    col = "ABCDEFGHJKLMNPQRSTUVWXYZ"[rng.integers(24)]
    row = "ABCDEFGHJKLMNPQRSTUV"[rng.integers(20)]
    return f"{zone:02d}{_latitude_band(lat)}{col}{row}"


@dataclass(frozen=True)
class Footprint:
    """A north-up 10 m grid: ``size`` x ``size`` pixels, upper-left corner (left, top) in metres of ``epsg``."""

    epsg: int
    left: float
    top: float
    size: int

    @property
    def crs(self) -> str:
        return f"EPSG:{self.epsg}"

    def x_centres(self) -> np.ndarray:
        """Easting of pixel centres, float64 (size,), metres."""
        return self.left + 5.0 + 10.0 * np.arange(self.size)

    def y_centres(self) -> np.ndarray:
        """Northing of pixel centres, float64 (size,), metres, north to south."""
        return self.top - 5.0 - 10.0 * np.arange(self.size)

    def transform(self, res_m: int = 10, dx_px: int = 0):
        """Affine transform of this footprint at ``res_m`` metres, shifted ``dx_px`` 10 m pixels east."""
        return _north_up(self.left + 10.0 * dx_px, self.top, res_m)


def footprint_at(lat: float, lon: float, size: int) -> tuple[Footprint, float, float]:
    """The size x size 10 m UTM grid centred on (lat, lon), snapped to whole 10 m.

    Returns the footprint and the (lat, lon) of its exact centre, so that the centre
    coordinates written to an archive reproject to the grid centre.
    """
    epsg = utm_epsg(lat, lon)
    xs, ys = warp_transform("EPSG:4326", f"EPSG:{epsg}", [lon], [lat])
    cx, cy = round(xs[0] / 10.0) * 10.0, round(ys[0] / 10.0) * 10.0
    half = size * 5.0
    lons, lats = warp_transform(f"EPSG:{epsg}", "EPSG:4326", [cx], [cy])
    return Footprint(epsg, cx - half, cy + half, size), float(lats[0]), float(lons[0])


@dataclass(frozen=True)
class Acquisitions:
    """One location's four seasonal acquisitions: datetime64[ns] (4,) per modality and product ids."""

    s2_time: np.ndarray
    s1_time: np.ndarray
    s2_ids: tuple[str, ...]
    s1_ids: tuple[str, ...]
    seasons: tuple[int, ...]


def _stamp(t: np.datetime64) -> str:
    """20200307T103021 from a datetime64."""
    return np.datetime_as_string(t, unit="s").replace("-", "").replace(":", "")


def _s1_product_id(rng: np.random.Generator, start: np.datetime64) -> str:
    """S1A_IW_GRDH_1SDV_<start>_<stop>_<abs orbit>_<datatake>_<unique id>, dual-pol VV+VH."""
    mission = "S1A" if rng.random() < 0.6 else "S1B"
    if start >= np.datetime64("2021-12-23"):  # S1B failed that day; S1A flew alone after
        mission = "S1A"
    stop = start + np.timedelta64(25, "s")
    launch = np.datetime64("2014-04-03")  # S1A repeats 175 orbits every 12 days since launch
    orbit = int((start - launch) / np.timedelta64(1, "D") * 175 / 12) + 1
    datatake = int(rng.integers(0x10000, 0xFFFFFF))
    unique = int(rng.integers(0, 0xFFFF))
    return f"{mission}_IW_GRDH_1SDV_{_stamp(start)}_{_stamp(stop)}_{orbit:06d}_{datatake:06X}_{unique:04X}"


def _seasonal_dates(rng: np.random.Generator, lat: float, lon: float, tile: str) -> Acquisitions:
    """Four acquisitions a season apart (spring to winter of one year), S1 1-2 days off S2.

    S2 passes at about 10:30 local solar time, S1 at about 06:00 or 18:00; UTC follows
    from the longitude. In the south the seasons of the same dates are shifted by two.
    """
    year = int(rng.integers(2019, 2022))
    centres = [f"{year}-03-20", f"{year}-06-21", f"{year}-09-22", f"{year}-12-21"]
    utc_offset_s = -lon / 15.0 * 3600.0
    s2_time, s1_time, s2_ids, s1_ids = [], [], [], []
    s1_local_h = 6.0 if rng.random() < 0.5 else 18.0
    for c in centres:
        day = np.datetime64(c, "D") + np.timedelta64(int(rng.integers(-20, 21)), "D")
        s2_sec = int(10.5 * 3600 + utc_offset_s + rng.integers(-900, 900))
        t2 = day.astype("datetime64[s]") + np.timedelta64(s2_sec, "s")
        s1_day = day + np.timedelta64(int(rng.choice([-2, -1, 1, 2])), "D")
        s1_sec = int(s1_local_h * 3600 + utc_offset_s + rng.integers(-600, 600))
        t1 = s1_day.astype("datetime64[s]") + np.timedelta64(s1_sec, "s")
        s2_time.append(t2)
        s1_time.append(t1)
        # GEE-style Sentinel-2 index: datatake sensing start, granule start, tile.
        granule = t2 + np.timedelta64(int(rng.integers(30, 600)), "s")
        s2_ids.append(f"{_stamp(t2)}_{_stamp(granule)}_T{tile}")
        s1_ids.append(_s1_product_id(rng, t1))
    seasons = (0, 1, 2, 3) if lat >= 0 else (2, 3, 0, 1)
    return Acquisitions(np.array(s2_time, dtype="datetime64[ns]"), np.array(s1_time, dtype="datetime64[ns]"),
                        tuple(s2_ids), tuple(s1_ids), seasons)


def _random_land_point(rng: np.random.Generator) -> tuple[float, float]:
    """A (lat, lon) in the latitudes where SSL4EO-S12 samples cities (no polar UTM oddities)."""
    return float(rng.uniform(-45.0, 62.0)), float(rng.uniform(-125.0, 150.0))


@dataclass(frozen=True)
class Location:
    """Everything fixed about one SSL4EO location: id, grid, dates, land cover."""

    id: int
    footprint: Footprint
    center_lat: float
    center_lon: float
    acquisitions: Acquisitions
    scene: Scene

    @property
    def name(self) -> str:
        return f"{self.id:07d}"


def _location(seed: int, loc_id: int, size: int) -> Location:
    """The location ``loc_id`` of the archive drawn from ``seed`` (a pure function of both)."""
    rng = _rng(seed, _STREAM_META, loc_id)
    lat, lon = _random_land_point(rng)
    fp, clat, clon = footprint_at(lat, lon, size)
    acq = _seasonal_dates(rng, clat, clon, _mgrs_tile(rng, clat, clon))
    scene = draw_scene(_rng(seed, _STREAM_SCENE, loc_id), size)
    return Location(loc_id, fp, clat, clon, acq, scene)


def _north_up(left: float, top: float, res_m: float) -> Affine:
    """Affine pixel -> map transform of a north-up grid with square ``res_m`` pixels."""
    return Affine(res_m, 0.0, left, 0.0, -res_m, top)


def _check_size(size: int) -> None:
    if size <= 0 or size % 6:
        raise ValueError(f"size must be a positive multiple of 6 (60 m bands are size/6 px), got {size}")


# --- SSL4EO-S12 v1.1: zipped Zarr v2 -----------------------------------------------------------

SSL4EO_ZARR_PRODUCTS = ("S1GRD", "S2L1C", "S2L2A")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # earliest date a zip entry can carry: no wall-clock time in the files


def _ssl4eo_dataset(locs: Sequence[Location], product: str, cubes: np.ndarray):
    """The xarray Dataset of one SSL4EO-S12 v1.1 file.

    ``cubes``: (sample, 4, band, size, size), already encoded (int16 S2 with offset, float16 S1 dB).
    x / y are one axis per file: they hold the first sample's grid (what concatenating
    per-sample datasets with join="override" leaves); every sample's own grid is centred
    on its (center_lat, center_lon) in its ``crs``.
    """
    import xarray as xr

    s1 = product == "S1GRD"
    bands = S1_BANDS if s1 else (S2_L1C_BANDS if product == "S2L1C" else S2_L2A_BANDS)
    first = locs[0].footprint
    acqs = [loc.acquisitions for loc in locs]
    time_ = np.stack([a.s1_time if s1 else a.s2_time for a in acqs])
    file_id = np.array([a.s1_ids if s1 else a.s2_ids for a in acqs])
    ds = xr.Dataset(
        {"bands": (("sample", "time", "band", "y", "x"), cubes)},
        coords={
            "sample": np.array([loc.name for loc in locs]),
            "time": np.arange(4, dtype=np.int64),
            "band": np.array(bands),
            "y": first.y_centres(),
            "x": first.x_centres(),
            "center_lat": ("sample", np.array([loc.center_lat for loc in locs])),
            "center_lon": ("sample", np.array([loc.center_lon for loc in locs])),
            "crs": ("sample", np.array([loc.footprint.crs for loc in locs])),
            "time_": (("sample", "time"), time_),
            "file_id": (("sample", "time"), file_id),
        },
    )
    if not s1:
        # Scene classification as in the published S2 files: 0 land, 1 water (no clouds here).
        water = np.stack([loc.scene.crop(first.size).classes == WATER for loc in locs]).astype(np.uint8)
        ds["cloud_mask"] = (("sample", "time", "y", "x"), np.repeat(water[:, None], 4, axis=1))
    size = cubes.shape[-1]
    encoding = {
        "bands": {"chunks": (1, 4, len(bands), size, size)},
        # Integers since the epoch, whatever the dates: the same units in every file.
        "time_": {"units": "nanoseconds since 1970-01-01", "calendar": "proleptic_gregorian", "dtype": "int64"},
    }
    if not s1:
        encoding["cloud_mask"] = {"chunks": (1, 4, size, size)}
    return ds, encoding


def _write_zarr_zip(ds, encoding: dict, path: Path) -> None:
    """Write ``ds`` as a Zarr v2 store with consolidated metadata, zipped, byte-reproducibly.

    xarray writes into an in-memory store; the zip is then laid out here because
    zarr's ZipStore stamps each entry with the wall clock and, as xarray rewrites
    attributes after creating an array, stores those entries twice (readers take
    the last). The result reads with ``zarr.storage.ZipStore(path, mode="r")``.
    Entries are stored uncompressed (ZipStore's default): the chunks are already
    Blosc-compressed.
    """
    import zarr

    entries: dict = {}
    store = zarr.storage.MemoryStore(store_dict=entries)
    # write_empty_chunks: an all-zero cloud_mask chunk must still be written; with
    # fill_value null, readers differ on what a missing chunk holds.
    ds.to_zarr(store, zarr_format=2, consolidated=True, encoding=encoding, mode="w", write_empty_chunks=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in sorted(entries):
            info = zipfile.ZipInfo(key, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.create_system = 3  # unix, whatever machine writes it
            zf.writestr(info, entries[key].to_bytes())
    tmp.replace(path)


def _encode_s2_zarr(reflectance: np.ndarray) -> np.ndarray:
    """Reflectance x 10000 (float) -> int16 with the v1.1 offset of +1000; 0 is reserved for no-data."""
    return np.clip(np.rint(reflectance) + S2_ZARR_OFFSET, 1, np.iinfo(np.int16).max).astype(np.int16)


def make_ssl4eo_zarr(root: str | Path, splits: Mapping[str, int] | None = None, samples_per_file: int = 4,
                     size: int = 264, seed: int = 0,
                     products: Sequence[str] = SSL4EO_ZARR_PRODUCTS) -> dict:
    """Write an SSL4EO-S12 v1.1 archive of zipped Zarr v2 stores.

    Layout: ``root/{split}/{product}/ssl4eos12_{split}_seasonal_data_{NNNNNN}.zarr.zip``,
    NNNNNN counting from 000001 per split; the files of one number hold the same
    locations in the same order in every product.

    Each store: ``bands`` (sample, time=4, band, y=size, x=size), chunked one sample
    per chunk; S2 int16 reflectance x 10000 + 1000 (0 = no-data), 13 bands (L1C) or
    12 (L2A), 20 m / 60 m bands blocky as resampled from their native grid; S1 float16
    dB, bands (VV, VH). S2 stores also hold ``cloud_mask`` (sample, time, y, x) uint8
    (0 land, 1 water). Coordinates: ``sample`` (7-digit id strings), ``time`` (0..3),
    ``band``, ``y``/``x`` (float64 metres, pixel centres, 10 m apart, of the first
    sample's grid), ``center_lat``/``center_lon`` (sample,) float64 degrees, ``crs``
    (sample,) "EPSG:326zz"/"EPSG:327zz", ``time_`` (sample, time) datetime64[ns]
    acquisition times (S1 1-2 days off S2), ``file_id`` (sample, time) product ids.

    ``splits``: files per split, default {"train": 2, "val": 1}. ``size`` must be a
    multiple of 6. Returns {"root", "size", "products", "splits": {split: {"files":
    {product: [path, ...]}, "samples": [[id, ...] per file]}}}.
    """
    import xarray  # noqa: F401  (fail here, before any file is written, if it is missing)

    _check_size(size)
    splits = {"train": 2, "val": 1} if splits is None else dict(splits)
    unknown = set(products) - set(SSL4EO_ZARR_PRODUCTS)
    if unknown:
        raise ValueError(f"unknown products {sorted(unknown)}; choose from {SSL4EO_ZARR_PRODUCTS}")
    root = Path(root)
    # Consecutive ids from a seeded start, as in the published files.
    next_id = int(_rng(seed, _STREAM_ARCHIVE).integers(0, 250_000 - 100_000))
    result: dict = {"root": str(root), "size": size, "products": list(products), "splits": {}}
    for split, n_files in splits.items():
        files: dict[str, list[str]] = {p: [] for p in products}
        samples: list[list[str]] = []
        for number in range(1, n_files + 1):
            locs = [_location(seed, next_id + i, size) for i in range(samples_per_file)]
            next_id += samples_per_file
            samples.append([loc.name for loc in locs])
            cubes = _render_ssl4eo_cubes(seed, locs, products, size)
            for product in products:
                ds, encoding = _ssl4eo_dataset(locs, product, cubes[product])
                path = root / split / product / f"ssl4eos12_{split}_seasonal_data_{number:06d}.zarr.zip"
                _write_zarr_zip(ds, encoding, path)
                files[product].append(str(path))
        result["splits"][split] = {"files": files, "samples": samples}
    return result


def _render_ssl4eo_cubes(seed: int, locs: Sequence[Location], products: Sequence[str], size: int) -> dict:
    """Encoded cubes (sample, 4, band, size, size) per product for the locations of one file."""
    out: dict[str, list[np.ndarray]] = {p: [] for p in products}
    for loc in locs:
        scene = loc.scene.crop(size)
        seasons = loc.acquisitions.seasons
        if "S1GRD" in products:
            db = render_s1(_rng(seed, _STREAM_S1, loc.id), scene, seasons)
            out["S1GRD"].append(db.astype(np.float16))
        for product, level, bands in (("S2L1C", "L1C", S2_L1C_BANDS), ("S2L2A", "L2A", S2_L2A_BANDS)):
            if product in products:
                # Same generator state for both levels: same surface, same sensor noise.
                refl = render_s2(_rng(seed, _STREAM_S2, loc.id), scene, seasons, level)
                out[product].append(_encode_s2_zarr(resample_to_10m(refl, bands)))
    return {p: np.stack(v) for p, v in out.items()}


# --- GeoTIFF helpers ---------------------------------------------------------------------------


def _write_tif(path: Path, array: np.ndarray, crs: str, transform) -> None:
    """One single-band GeoTIFF (deflate), ``array`` (H, W) in its final dtype."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff", "count": 1, "dtype": array.dtype.name, "height": array.shape[0],
        "width": array.shape[1], "crs": crs, "transform": transform, "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array, 1)


def _encode_s2_tif(reflectance: np.ndarray) -> np.ndarray:
    """Reflectance x 10000 (float) -> uint16, no offset; 0 is left for no-data."""
    return np.clip(np.rint(reflectance), 1, np.iinfo(np.uint16).max).astype(np.uint16)


# --- SSL4EO-S12 v1: GeoTIFF tree ---------------------------------------------------------------


def make_ssl4eo_tiff(root: str | Path, n_locations: int = 3, size: int = 264, seed: int = 0,
                     misaligned: Iterable[int | str] = (), missing_s1: Iterable[int | str] = (),
                     start_id: int = 0) -> dict:
    """Write an SSL4EO-S12 v1 GeoTIFF tree for locations ``start_id .. start_id + n_locations - 1``.

    ``root/s1/<id>/<S1 product id>/{VV,VH}.tif``: float32 dB, size x size, 10 m.
    ``root/s2c/<id>/<S2 product id>/{B1..B12,B8A}.tif``: uint16 L1C reflectance x 10000
    (no offset), at native resolution: 10 m bands size px, 20 m size/2, 60 m size/6 (the
    block means of the 10 m field). ``<id>`` is 7 digits; one product folder per season
    and modality (4 each). Every file is a one-band GeoTIFF in the location's UTM CRS.
    S1 and S2 cover the same footprint, except for ids in ``misaligned`` whose S1 grid
    (and content) is shifted 3 pixels (30 m) east; ids in ``missing_s1`` get no S1 folder.

    Returns {"root", "size", "locations": [id, ...], "s1": {id: [product, ...]},
    "s2": {id: [product, ...]}, "misaligned": [id, ...], "missing_s1": [id, ...]}.
    """
    _check_size(size)
    root = Path(root)
    names = [f"{i:07d}" for i in range(start_id, start_id + n_locations)]
    misaligned_ids = {f"{int(i):07d}" for i in misaligned}
    missing_ids = {f"{int(i):07d}" for i in missing_s1}
    result: dict = {"root": str(root), "size": size, "locations": names, "s1": {}, "s2": {},
                    "misaligned": sorted(misaligned_ids & set(names)), "missing_s1": sorted(missing_ids & set(names))}
    for loc_id, name in zip(range(start_id, start_id + n_locations), names):
        loc = _location(seed, loc_id, size)
        acq, fp = loc.acquisitions, loc.footprint
        refl = render_s2(_rng(seed, _STREAM_S2, loc_id), loc.scene.crop(size), acq.seasons, "L1C")
        per_band = to_native_resolution(refl, S2_L1C_BANDS)  # each (4, h_b, w_b)
        result["s2"][name] = list(acq.s2_ids)
        for t, product in enumerate(acq.s2_ids):
            for b, band in enumerate(S2_L1C_BANDS):
                _write_tif(root / "s2c" / name / product / f"{band}.tif", _encode_s2_tif(per_band[b][t]),
                           fp.crs, fp.transform(S2_RESOLUTION_M[band]))
        if name in missing_ids:
            continue
        dx = 3 if name in misaligned_ids else 0
        db = render_s1(_rng(seed, _STREAM_S1, loc_id), loc.scene.crop(size, dx), acq.seasons)
        result["s1"][name] = list(acq.s1_ids)
        for t, product in enumerate(acq.s1_ids):
            for p, pol in enumerate(S1_BANDS):
                _write_tif(root / "s1" / name / product / f"{pol}.tif", db[t, p], fp.crs, fp.transform(10, dx))
    return result


# --- BigEarthNet v2 ----------------------------------------------------------------------------

# (country, MGRS tile, lat, lon of a point in the tile): where BigEarthNet patches come from.
_BEN_TILES = (
    ("Austria", "33UUP", 47.9, 13.4),
    ("Portugal", "29SND", 39.2, -8.3),
    ("Finland", "35VLH", 61.2, 24.8),
    ("Ireland", "29UNV", 53.3, -7.6),
    ("Serbia", "34TDQ", 44.6, 20.4),
    ("Lithuania", "34UFG", 55.1, 23.6),
    ("Belgium", "31UFS", 50.8, 4.4),
    ("Switzerland", "32TMT", 46.9, 8.0),
    ("Luxembourg", "32ULA", 49.7, 6.2),
    ("Kosovo", "34TEN", 42.6, 21.0),
)
BIGEARTHNET_SPLITS = ("train", "validation", "test")
_BEN_PATCH_M = 1200  # patch grid spacing within a tile: 120 px at 10 m


def _season_of(t: np.datetime64) -> int:
    """Northern-hemisphere season index of a date: Mar-May 0, Jun-Aug 1, Sep-Nov 2, Dec-Feb 3."""
    month = int(str(t)[5:7])
    return ((month - 3) % 12) // 3


def make_bigearthnet(root: str | Path, n_patches: int = 12, size: int = 120, seed: int = 0,
                     splits: Sequence[str] = BIGEARTHNET_SPLITS) -> dict:
    """Write a BigEarthNet v2 (reBEN) archive of ``n_patches`` S1/S2 patch pairs.

    ``root/BigEarthNet-S2/<tile>/<patch_id>/<patch_id>_<band>.tif``: the 12 L2A bands
    (:data:`BIGEARTHNET_S2_BANDS`), uint16 reflectance x 10000; 10 m bands size px,
    20 m size/2, 60 m size/6. ``<tile>`` = S2A_MSIL2A_<date>_N9999_R<orbit>_T<mgrs>,
    ``<patch_id>`` = <tile>_<col>_<row>.
    ``root/BigEarthNet-S1/<s1 tile>/<s1_name>/<s1_name>_{VV,VH}.tif``: float32 dB,
    size px; ``<s1 tile>`` = S1x_IW_GRDH_1SDV_<start>, ``<s1_name>`` = <s1 tile>_<mgrs>_<col>_<row>.
    S1 and S2 of a patch share CRS and footprint (10 m grid, size x 10 m across; patch
    origins are 1200 m apart within a tile as in the real grid).
    ``root/metadata.parquet``: patch_id, labels (list of BigEarthNet-19 names, from the
    classes covering >= LABEL_MIN_FRACTION of the patch), split, country, s1_name,
    s2v1_name, contains_seasonal_snow, contains_cloud_or_shadow (both False).

    Splits go round-robin over a seeded shuffle, so each split has a patch once
    n_patches >= len(splits). Returns {"root", "size", "patches": [patch_id, ...],
    "s1_names": [...], "splits": {split: [patch_id, ...]}, "labels": {patch_id: [...]},
    "metadata": path}.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_size(size)
    if not splits:
        raise ValueError("splits must name at least one split")
    root = Path(root)
    rng = _rng(seed, _STREAM_ARCHIVE, _BEN_KEY)
    n_tiles = max(1, min(len(_BEN_TILES), math.ceil(n_patches / 4)))
    tile_rows = [_BEN_TILES[i] for i in rng.permutation(len(_BEN_TILES))[:n_tiles]]
    # One S2 acquisition per tile (BigEarthNet spans June 2017 - May 2018) and its S1 partner.
    tiles = []
    for country, mgrs, lat, lon in tile_rows:
        day = np.datetime64("2017-06-01") + np.timedelta64(int(rng.integers(0, 365)), "D")
        t2 = day.astype("datetime64[s]") + np.timedelta64(int((10.5 - lon / 15) * 3600 + rng.integers(-900, 900)), "s")
        t1 = (day + np.timedelta64(int(rng.integers(0, 2)), "D")).astype("datetime64[s]") + np.timedelta64(
            int((17.5 - lon / 15) * 3600 + rng.integers(-600, 600)), "s")
        s2_tile = f"S2{'AB'[rng.integers(2)]}_MSIL2A_{_stamp(t2)}_N9999_R{int(rng.integers(1, 144)):03d}_T{mgrs}"
        s1_tile = f"S1{'AB'[rng.integers(2)]}_IW_GRDH_1SDV_{_stamp(t1)}"
        epsg = utm_epsg(lat, lon)
        xs, ys = warp_transform("EPSG:4326", f"EPSG:{epsg}", [lon], [lat])
        # MGRS tiles start at whole 100 km lines (the S2 grid's 40 m overlap margin aside).
        origin = (math.floor(xs[0] / 1e5) * 1e5 - 40.0, math.ceil(ys[0] / 1e5) * 1e5)
        cells = rng.permutation(90 * 90)  # distinct (col, row) per patch within the tile
        tiles.append({"country": country, "mgrs": mgrs, "s2_tile": s2_tile, "s1_tile": s1_tile,
                      "epsg": epsg, "origin": origin, "cells": cells, "season": _season_of(t2), "used": 0})

    order = rng.permutation(n_patches)
    split_of = {int(p): splits[k % len(splits)] for k, p in enumerate(order)}
    rows = {name: [] for name in ("patch_id", "labels", "split", "country", "s1_name", "s2v1_name",
                                  "contains_seasonal_snow", "contains_cloud_or_shadow")}
    result: dict = {"root": str(root), "size": size, "patches": [], "s1_names": [],
                    "splits": {s: [] for s in splits}, "labels": {}}
    for p in range(n_patches):
        tile = tiles[p % n_tiles]
        cell = int(tile["cells"][tile["used"]])
        tile["used"] += 1
        col, row = cell % 90, cell // 90
        patch_id = f"{tile['s2_tile']}_{col}_{row}"
        s1_name = f"{tile['s1_tile']}_{tile['mgrs']}_{col}_{row}"
        s2v1_name = f"{tile['s2_tile'].split('_N9999_')[0]}_{col}_{row}"
        left = tile["origin"][0] + col * _BEN_PATCH_M
        top = tile["origin"][1] - row * _BEN_PATCH_M
        crs = f"EPSG:{tile['epsg']}"
        scene = draw_scene(_rng(seed, _STREAM_SCENE, _BEN_KEY, p), size).crop(size)
        season = (tile["season"],)
        refl = render_s2(_rng(seed, _STREAM_S2, _BEN_KEY, p), scene, season, "L2A")[0]  # (12, H, W)
        s2_dir = root / "BigEarthNet-S2" / tile["s2_tile"] / patch_id
        for band, ben_band, coarse in zip(S2_L2A_BANDS, BIGEARTHNET_S2_BANDS, to_native_resolution(refl, S2_L2A_BANDS)):
            res = S2_RESOLUTION_M[band]
            _write_tif(s2_dir / f"{patch_id}_{ben_band}.tif", _encode_s2_tif(coarse), crs,
                       _north_up(left, top, res))
        db = render_s1(_rng(seed, _STREAM_S1, _BEN_KEY, p), scene, season)[0]  # (2, H, W)
        s1_dir = root / "BigEarthNet-S1" / tile["s1_tile"] / s1_name
        for pol, img in zip(S1_BANDS, db):
            _write_tif(s1_dir / f"{s1_name}_{pol}.tif", img, crs, _north_up(left, top, 10))
        labels = bigearthnet_labels(scene.classes)
        for key, value in (("patch_id", patch_id), ("labels", labels), ("split", split_of[p]),
                           ("country", tile["country"]), ("s1_name", s1_name), ("s2v1_name", s2v1_name),
                           ("contains_seasonal_snow", False), ("contains_cloud_or_shadow", False)):
            rows[key].append(value)
        result["patches"].append(patch_id)
        result["s1_names"].append(s1_name)
        result["splits"][split_of[p]].append(patch_id)
        result["labels"][patch_id] = labels
    schema = pa.schema([
        ("patch_id", pa.string()), ("labels", pa.list_(pa.string())), ("split", pa.string()),
        ("country", pa.string()), ("s1_name", pa.string()), ("s2v1_name", pa.string()),
        ("contains_seasonal_snow", pa.bool_()), ("contains_cloud_or_shadow", pa.bool_()),
    ])
    root.mkdir(parents=True, exist_ok=True)
    meta = root / "metadata.parquet"
    pq.write_table(pa.table(rows, schema=schema), meta)
    result["metadata"] = str(meta)
    return result


# --- command line ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipeline.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=("ssl4eo-zarr", "ssl4eo-tiff", "bigearthnet"))
    parser.add_argument("outdir")
    parser.add_argument("--n", type=int, default=None,
                        help="ssl4eo-zarr: samples per file (4); ssl4eo-tiff: locations (3); bigearthnet: patches (12)")
    parser.add_argument("--size", type=int, default=None, help="pixels per side at 10 m (264, 264, 120)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-files", type=int, default=2, help="ssl4eo-zarr: files in the train split")
    parser.add_argument("--val-files", type=int, default=1, help="ssl4eo-zarr: files in the val split")
    args = parser.parse_args(argv)
    kw = {"seed": args.seed}
    if args.size is not None:
        kw["size"] = args.size
    if args.kind == "ssl4eo-zarr":
        if args.n is not None:
            kw["samples_per_file"] = args.n
        out = make_ssl4eo_zarr(args.outdir, splits={"train": args.train_files, "val": args.val_files}, **kw)
        count = sum(len(s) for sp in out["splits"].values() for s in sp["samples"])
        print(f"wrote {count} locations x {len(out['products'])} products under {args.outdir}")
    elif args.kind == "ssl4eo-tiff":
        if args.n is not None:
            kw["n_locations"] = args.n
        out = make_ssl4eo_tiff(args.outdir, **kw)
        print(f"wrote {len(out['locations'])} locations under {args.outdir}")
    else:
        if args.n is not None:
            kw["n_patches"] = args.n
        out = make_bigearthnet(args.outdir, **kw)
        print(f"wrote {len(out['patches'])} patches under {args.outdir}")
    return out


if __name__ == "__main__":
    main()
