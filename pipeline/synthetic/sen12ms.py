"""SEN12MS: multi-band GeoTIFF triplets (s1, s2, lc) per patch, as :mod:`pipeline.sources.sen12ms` reads them.

Each patch's land cover (``scene``) drives all three files: Sentinel-2 L1C and Sentinel-1
are rendered from it, and the lc file's IGBP band is the land cover itself, written
with IGBP codes (forest pixels as two forest types and cropland pixels as cropland or
cropland/natural-vegetation mosaic, split by the texture, so that the simplified
scheme's grouping matters). Labels read back from the lc band therefore follow the
pixels of the other two files.
"""

from __future__ import annotations

from pathlib import Path
import numpy as np
import rasterio

from pipeline.synthetic.geo import footprint_at, north_up
from pipeline.synthetic.geotiff import encode_s2_tif
from pipeline.synthetic.published import (
    S1_BANDS,
    S2_L1C_BANDS,
    SEN12MS_FILE_NAME as FILE_NAME,
    SEN12MS_LC_BANDS as LC_BANDS,
    SEN12MS_SEASON_FOLDERS as SEASON_FOLDERS,
    SEN12MS_SPLIT_FILES as SPLIT_FILES,
)
from pipeline.synthetic.scene import (
    BARE,
    CROPLAND,
    FOREST,
    GRASSLAND,
    STREAM_ARCHIVE,
    STREAM_S1,
    STREAM_S2,
    STREAM_SCENE,
    URBAN,
    WATER,
    Scene,
    draw_scene,
    keyed_rng,
    render_s1,
    render_s2,
    resample_to_10m,
)



def patch_id(roi: str, scene: int, patch: int) -> str:
    """The inventory's name of one triplet: its file name without the modality ('ROIs1158_spring_1_p30')."""
    return f"{roi}_{scene}_p{patch}"


# SEN12MS patches draw from their own key space (BigEarthNet uses 1, SSL4EO locations none).
_SEN12MS_KEY = 2
# IGBP code per land-cover class: (code where the texture is low, code where it is high).
SEN12MS_IGBP_OF_CLASS = {
    WATER: (17, 17),      # water bodies
    FOREST: (1, 4),       # evergreen needleleaf / deciduous broadleaf forest: both "Forest"
    CROPLAND: (12, 14),   # cropland / cropland-natural vegetation mosaic: both "Croplands"
    URBAN: (13, 13),      # urban and built-up
    GRASSLAND: (10, 10),  # grassland
    BARE: (16, 16),       # barren
}
# Bands 2-4 of lc (LCCS land cover, land use, surface hydrology): one fixed code per class; nothing reads them.
_LCCS_OF_CLASS = {WATER: (3, 3, 3), FOREST: (11, 10, 10), CROPLAND: (36, 36, 30), URBAN: (9, 9, 30),
                  GRASSLAND: (31, 30, 30), BARE: (1, 1, 1)}


def sen12ms_igbp(scene: Scene) -> np.ndarray:
    """The IGBP codes (H, W) uint16 the lc file's band 1 holds for ``scene``."""
    high = scene.texture > 0.0
    out = np.zeros(scene.classes.shape, dtype=np.uint16)
    for cls, (low_code, high_code) in SEN12MS_IGBP_OF_CLASS.items():
        here = scene.classes == cls
        out[here & ~high] = low_code
        out[here & high] = high_code
    return out


def make_sen12ms(root: str | Path, n_scenes: int = 4, patches_per_scene: int = 3, size: int = 256, seed: int = 0,
                 split_lists: bool = True, test_scenes: int = 1) -> dict:
    """Write a SEN12MS tree of ``n_scenes`` scenes (season folders in turn) of ``patches_per_scene`` patches.

    ``root/ROIs<seed>_<season>/{s1,s2,lc}_<scene>/ROIs<seed>_<season>_{s1,s2,lc}_<scene>_p<patch>.tif``:
    s1 float32 (2, size, size) VV, VH dB; s2 uint16 (13, size, size) L1C reflectance x 10000, bands
    B1..B8, B8A, B9..B12, every band on the 10 m grid (20 m / 60 m bands blocky, as resampled from their
    native grid); lc uint16 (4, size, size) IGBP, then three LCCS layers. One 10 m UTM grid per patch,
    shared by its three files; the patches of a scene lie side by side. With ``split_lists``,
    ``train_list.txt`` and ``test_list.txt`` name the S2 file of every patch, the patches of
    ``test_scenes`` seeded scenes held out for test, as in the release.

    Returns {"root", "size", "patches": [patch id, ...], "splits": {"train": [...], "test": [...]},
    "files": {patch id: {"s1", "s2", "lc": path}}, "igbp": {patch id: (size, size) uint16 array}}.
    """
    if size < 1 or n_scenes < 1 or patches_per_scene < 1:
        raise ValueError("size, n_scenes and patches_per_scene must be >= 1")
    root = Path(root)
    rng = keyed_rng(seed, STREAM_ARCHIVE, _SEN12MS_KEY)
    numbers = {folder: rng.permutation(np.arange(1, 200))[: n_scenes] for folder in SEASON_FOLDERS}
    held_out = set(rng.permutation(n_scenes)[: min(test_scenes, n_scenes)].tolist()) if split_lists else set()
    result: dict = {"root": str(root), "size": size, "patches": [], "splits": {"train": [], "test": []},
                    "files": {}, "igbp": {}}
    for k in range(n_scenes):
        folder = SEASON_FOLDERS[k % len(SEASON_FOLDERS)]
        scene_no = int(numbers[folder][k // len(SEASON_FOLDERS)])
        lat, lon = float(rng.uniform(-45.0, 62.0)), float(rng.uniform(-125.0, 150.0))
        for p in range(1, patches_per_scene + 1):
            pid = patch_id(folder, scene_no, p)
            files, igbp = _write_patch(root, seed, (k, p), folder, scene_no, p, (lat, lon), size)
            result["patches"].append(pid)
            result["files"][pid] = files
            result["igbp"][pid] = igbp
            result["splits"]["test" if k in held_out else "train"].append(pid)
    if split_lists:
        for split, name in SPLIT_FILES.items():
            lines = [Path(result["files"][pid]["s2"]).name for pid in result["splits"][split]]
            (root / name).write_text("".join(f"{line}\n" for line in lines))
    return result


def _write_patch(root: Path, seed: int, key: tuple[int, int], folder: str, scene_no: int, p: int,
                 latlon: tuple[float, float], size: int) -> tuple[dict, np.ndarray]:
    """Write the three files of one patch; returns their paths and the IGBP band."""
    padded = -(-size // 6) * 6  # the 60 m bands need whole 6 x 6 blocks: render larger, crop after
    scene = draw_scene(keyed_rng(seed, STREAM_SCENE, _SEN12MS_KEY, *key), padded).crop(padded)
    lat, lon = latlon
    fp, clat, _ = footprint_at(lat, lon, size)
    transform = north_up(fp.left + (p - 1) * size * 10.0, fp.top, 10)
    season = ((SEASON_FOLDERS.index(folder) + (0 if clat >= 0 else 2)) % 4,)  # southern seasons are shifted
    refl = render_s2(keyed_rng(seed, STREAM_S2, _SEN12MS_KEY, *key), scene, season, "L1C")[0]  # (13, P, P)
    s2 = encode_s2_tif(resample_to_10m(refl, S2_L1C_BANDS)[:, :size, :size])
    s1 = render_s1(keyed_rng(seed, STREAM_S1, _SEN12MS_KEY, *key), scene, season)[0][:, :size, :size]
    cropped = Scene(scene.classes[:size, :size], scene.texture[:size, :size], 0)
    igbp = sen12ms_igbp(cropped)
    lccs = np.array([_LCCS_OF_CLASS[c] for c in range(len(_LCCS_OF_CLASS))], dtype=np.uint16)[cropped.classes]
    lc = np.concatenate([igbp[None], np.moveaxis(lccs, -1, 0)])  # (4, H, W): IGBP, then the LCCS layers
    assert lc.shape[0] == len(LC_BANDS) and s1.shape[0] == len(S1_BANDS)
    files = {}
    for modality, array in (("s1", s1.astype(np.float32)), ("s2", s2), ("lc", lc)):
        path = root / folder / f"{modality}_{scene_no}" / FILE_NAME.format(roi=folder, modality=modality,
                                                                            scene=scene_no, patch=p)
        _write_stack(path, array, fp.crs, transform)
        files[modality] = str(path)
    return files, igbp


def _write_stack(path: Path, array: np.ndarray, crs: str, transform) -> None:
    """One multi-band GeoTIFF (deflate), ``array`` (bands, H, W) in its final dtype, no no-data value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "count": array.shape[0], "dtype": array.dtype.name, "height": array.shape[1],
               "width": array.shape[2], "crs": crs, "transform": transform, "compress": "deflate"}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
