"""Where and when a synthetic location is seen: UTM grids, MGRS tiles, dates and product ids.

A location is a point drawn on land, a north-up 10 m UTM footprint centred on it,
four seasonal acquisitions per modality named as the published products are, and
the land cover under it (:mod:`pipeline.synthetic.scene`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from affine import Affine
from rasterio.warp import transform as warp_transform

from pipeline.synthetic.scene import STREAM_META, STREAM_SCENE, Scene, draw_scene, keyed_rng

# --- grids -------------------------------------------------------------------------------------


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


def north_up(left: float, top: float, res_m: float) -> Affine:
    """Affine pixel -> map transform of a north-up grid with square ``res_m`` pixels."""
    return Affine(res_m, 0.0, left, 0.0, -res_m, top)


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
        return north_up(self.left + 10.0 * dx_px, self.top, res_m)


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


# --- dates and product ids ---------------------------------------------------------------------


@dataclass(frozen=True)
class Acquisitions:
    """One location's four seasonal acquisitions: datetime64[ns] (4,) per modality and product ids."""

    s2_time: np.ndarray
    s1_time: np.ndarray
    s2_ids: tuple[str, ...]
    s1_ids: tuple[str, ...]
    seasons: tuple[int, ...]


def stamp(t: np.datetime64) -> str:
    """20200307T103021 from a datetime64."""
    return np.datetime_as_string(t, unit="s").replace("-", "").replace(":", "")


def season_of(t: np.datetime64) -> int:
    """Northern-hemisphere season index of a date: Mar-May 0, Jun-Aug 1, Sep-Nov 2, Dec-Feb 3."""
    month = int(str(t)[5:7])
    return ((month - 3) % 12) // 3


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
    return f"{mission}_IW_GRDH_1SDV_{stamp(start)}_{stamp(stop)}_{orbit:06d}_{datatake:06X}_{unique:04X}"


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
        s2_ids.append(f"{stamp(t2)}_{stamp(granule)}_T{tile}")
        s1_ids.append(_s1_product_id(rng, t1))
    seasons = (0, 1, 2, 3) if lat >= 0 else (2, 3, 0, 1)
    return Acquisitions(np.array(s2_time, dtype="datetime64[ns]"), np.array(s1_time, dtype="datetime64[ns]"),
                        tuple(s2_ids), tuple(s1_ids), seasons)


# --- SSL4EO locations --------------------------------------------------------------------------


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


def location(seed: int, loc_id: int, size: int) -> Location:
    """The location ``loc_id`` of the archive drawn from ``seed`` (a pure function of both).

    Both SSL4EO layouts draw from this one key space, so a location id shows the same
    ground in the Zarr and the GeoTIFF archive of one seed.
    """
    rng = keyed_rng(seed, STREAM_META, loc_id)
    lat, lon = _random_land_point(rng)
    fp, clat, clon = footprint_at(lat, lon, size)
    acq = _seasonal_dates(rng, clat, clon, _mgrs_tile(rng, clat, clon))
    scene = draw_scene(keyed_rng(seed, STREAM_SCENE, loc_id), size)
    return Location(loc_id, fp, clat, clon, acq, scene)
