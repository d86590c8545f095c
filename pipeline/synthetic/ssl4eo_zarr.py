"""SSL4EO-S12 v1.1: zipped Zarr v2 stores of 4-season cubes, as :mod:`pipeline.sources.ssl4eo_zarr` reads them.

Product folders, file names and the S2 offset as published (:mod:`pipeline.synthetic.published`).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np

from pipeline.synthetic.geo import Location, location
from pipeline.synthetic.published import (
    S1_BANDS,
    S2_L1C_BANDS,
    S2_L2A_BANDS,
    S2_NODATA,
    SSL4EO_ZARR_FILE_NAME as FILE_NAME,
    SSL4EO_ZARR_S1_PRODUCT as S1_PRODUCT,
    SSL4EO_ZARR_S2_OFFSET as S2_OFFSET,
    SSL4EO_ZARR_S2_PRODUCTS as S2_PRODUCTS,
)
from pipeline.synthetic.scene import (
    STREAM_ARCHIVE,
    STREAM_S1,
    STREAM_S2,
    WATER,
    check_size,
    keyed_rng,
    render_s1,
    render_s2,
    resample_to_10m,
)

SSL4EO_ZARR_PRODUCTS = (S1_PRODUCT, *S2_PRODUCTS.values())
# Band names as the release spells them (the dataset card's xarray listing: 'B01' ... 'B8A', 'vv', 'vh').
RELEASE_BAND_NAMES = {"B8A": "B8A", "VV": "vv", "VH": "vh", **{f"B{i}": f"B{i:02d}" for i in range(1, 13)}}
S1Order = Union[str, Sequence[int]]
FORMS = ("release", "coordinates")
"""How a file holds its metadata: see ``form`` in `make_ssl4eo_zarr`."""
_S2_BANDS = {"L1C": S2_L1C_BANDS, "L2A": S2_L2A_BANDS}
_LEVEL_OF = {product: level for level, product in S2_PRODUCTS.items()}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # earliest date a zip entry can carry: no wall-clock time in the files


def make_ssl4eo_zarr(root: str | Path, splits: Mapping[str, int] | None = None, samples_per_file: int = 4,
                     size: int = 264, seed: int = 0,
                     products: Sequence[str] = SSL4EO_ZARR_PRODUCTS, s1_order: S1Order = "product_name",
                     form: str = "release") -> dict:
    """Write an SSL4EO-S12 v1.1 archive of zipped Zarr v2 stores, in the forms the release uses.

    Layout: ``root/{split}/{product}/ssl4eos12_{split}_seasonal_data_{NNNNNN}.zarr.zip``,
    NNNNNN counting from 000001 per split; the files of one number hold the same
    locations in the same order in every product.

    Each store (as the dataset card, DLR-MF-DAS/SSL4EO-S12-v1.1 README.md, lists it):
    ``bands`` (sample, time=4, band, y=size, x=size), chunked one sample per chunk;
    S2 int16 reflectance x 10000 + 1000 (0 = no-data), 13 bands (L1C) or 12 (L2A),
    20 m / 60 m bands blocky as resampled from their native grid; S1 float16 dB.
    Coordinates: ``sample`` (7-digit id strings), ``time`` (0..3), ``band`` ('B01' ..
    'B12', 'B8A'; 'vv', 'vh'), ``y`` / ``x`` (int64 pixel indices). Data variables:
    ``center_lat`` / ``center_lon`` (sample,) float64 degrees, ``crs`` (sample,) int64
    EPSG code (326zz / 327zz), ``file_id`` (sample, time) product ids, ``sample_id``
    (sample, time) '<id>_<t>', ``time_`` (sample, time) datetime64[ns] acquisition
    times (S1 1-2 days off S2), ``x_`` / ``y_`` (sample, x|y) float64 metres, each
    sample's own pixel centres; S2 stores add ``cloud_mask`` (sample, time, y, x) uint8
    (0 land, 1 water).

    ``s1_order``: how each location's four S1 acquisitions are stored. "product_name"
    (the release, DLR-MF-DAS/SSL4EO-S12-v1.1#4): cube and ``file_id`` in the sorted
    order of the product names (S1A before S1B, so not always chronological) while
    ``time_`` is sorted by date; "date": everything chronological (as the WebDataset
    release); or a permutation of range(4) applied to every location's cube and file_id
    (time_ stays sorted), for tests. S2 is always chronological.

    ``form``: "release" as above; "coordinates" holds the same values in the other form the reader accepts:
    every per-sample variable a coordinate, bands spelt 'B1' .. 'B12', 'B8A', 'VV', 'VH', and ``crs`` the
    string 'EPSG:326zz' (the listings of the dataset card and of its loaders differ on these points).

    ``splits``: files per split, default {"train": 2, "val": 1}. ``size`` must be a
    multiple of 6. Returns {"root", "size", "products", "splits": {split: {"files":
    {product: [path, ...]}, "samples": [[id, ...] per file]}}, "s1_order": {id: [k, ...]}}
    where ``s1_order[id][j]`` is the date rank (0 = earliest) of the S1 acquisition
    stored at time index j of that location's cube.
    """
    import xarray  # noqa: F401  (fail here, before any file is written, if it is missing)

    check_size(size)
    splits = {"train": 2, "val": 1} if splits is None else dict(splits)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    unknown = set(products) - set(SSL4EO_ZARR_PRODUCTS)
    if unknown:
        raise ValueError(f"unknown products {sorted(unknown)}; choose from {SSL4EO_ZARR_PRODUCTS}")
    root = Path(root)
    # Consecutive ids from a seeded start, as in the published files.
    next_id = int(keyed_rng(seed, STREAM_ARCHIVE).integers(0, 250_000 - 100_000))
    result: dict = {"root": str(root), "size": size, "products": list(products), "splits": {}, "s1_order": {}}
    for split, n_files in splits.items():
        files: dict[str, list[str]] = {p: [] for p in products}
        samples: list[list[str]] = []
        for number in range(1, n_files + 1):
            locs = [location(seed, next_id + i, size) for i in range(samples_per_file)]
            next_id += samples_per_file
            samples.append([loc.name for loc in locs])
            orders = [_s1_order(loc, s1_order) for loc in locs]
            result["s1_order"].update({loc.name: o for loc, o in zip(locs, orders)})
            cubes = _render_cubes(seed, locs, products, size)
            for product in products:
                ds, encoding = _dataset(locs, product, cubes[product], orders, form)
                path = root / split / product / FILE_NAME.format(split=split, number=number)
                _write_zarr_zip(ds, encoding, path)
                files[product].append(str(path))
        result["splits"][split] = {"files": files, "samples": samples}
    return result


def _s1_order(loc: Location, order: S1Order) -> list[int]:
    """Date ranks of the S1 acquisitions in the order ``order`` stores them (see `make_ssl4eo_zarr`)."""
    ids = loc.acquisitions.s1_ids  # chronological
    if order == "product_name":
        return sorted(range(len(ids)), key=lambda k: ids[k])
    if order == "date":
        return list(range(len(ids)))
    perm = [int(k) for k in order]
    if sorted(perm) != list(range(len(ids))):
        raise ValueError(f"s1_order must be 'product_name', 'date' or a permutation of 0..{len(ids) - 1}, got {order!r}")
    return perm


def _render_cubes(seed: int, locs: Sequence[Location], products: Sequence[str], size: int) -> dict:
    """Encoded cubes (sample, 4, band, size, size) per product for the locations of one file."""
    out: dict[str, list[np.ndarray]] = {p: [] for p in products}
    for loc in locs:
        scene = loc.scene.crop(size)
        seasons = loc.acquisitions.seasons
        if S1_PRODUCT in products:
            db = render_s1(keyed_rng(seed, STREAM_S1, loc.id), scene, seasons)
            out[S1_PRODUCT].append(db.astype(np.float16))
        for level, product in S2_PRODUCTS.items():
            if product in products:
                # Same generator state for both levels: same surface, same sensor noise.
                refl = render_s2(keyed_rng(seed, STREAM_S2, loc.id), scene, seasons, level)
                out[product].append(_encode_s2(resample_to_10m(refl, _S2_BANDS[level])))
    return {p: np.stack(v) for p, v in out.items()}


def _encode_s2(reflectance: np.ndarray) -> np.ndarray:
    """Reflectance x 10000 (float) -> int16 with the v1.1 offset of +1000; the no-data value is never written."""
    return np.clip(np.rint(reflectance) + S2_OFFSET, S2_NODATA + 1, np.iinfo(np.int16).max).astype(np.int16)


def _dataset(locs: Sequence[Location], product: str, cubes: np.ndarray, s1_orders: Sequence[Sequence[int]],
             form: str = "release"):
    """The xarray Dataset of one SSL4EO-S12 v1.1 file, and its Zarr encoding.

    ``cubes``: (sample, 4, band, size, size), already encoded (int16 S2 with offset, float16 S1 dB),
    time steps chronological; S1 cube and file_id are reordered here by ``s1_orders``, while time_
    stays chronological, as the release keeps it. ``form``: see `make_ssl4eo_zarr`.
    """
    import xarray as xr

    s1 = product == S1_PRODUCT
    bands = S1_BANDS if s1 else _S2_BANDS[_LEVEL_OF[product]]
    acqs = [loc.acquisitions for loc in locs]
    time_ = np.stack([a.s1_time if s1 else a.s2_time for a in acqs])
    file_id = np.array([a.s1_ids if s1 else a.s2_ids for a in acqs])
    if s1:
        order = np.array(s1_orders)  # (sample, 4) date rank stored at each index
        rows = np.arange(len(locs))[:, None]
        cubes, file_id = cubes[rows, order], file_id[rows, order]
    size = cubes.shape[-1]
    names = [loc.name for loc in locs]
    data = {
        "bands": (("sample", "time", "band", "y", "x"), cubes),
        "center_lat": ("sample", np.array([loc.center_lat for loc in locs])),
        "center_lon": ("sample", np.array([loc.center_lon for loc in locs])),
        "crs": ("sample", np.array([loc.footprint.epsg for loc in locs], dtype=np.int64)),
        "file_id": (("sample", "time"), file_id),
        "sample_id": (("sample", "time"), np.array([[f"{n}_{t}" for t in range(4)] for n in names])),
        "time_": (("sample", "time"), time_),
        "x_": (("sample", "x"), np.stack([loc.footprint.x_centres() for loc in locs])),
        "y_": (("sample", "y"), np.stack([loc.footprint.y_centres() for loc in locs])),
    }
    if not s1:
        # Scene classification as in the published S2 files: 0 land, 1 water (no clouds here).
        water = np.stack([loc.scene.crop(size).classes == WATER for loc in locs]).astype(np.uint8)
        data["cloud_mask"] = (("sample", "time", "y", "x"), np.repeat(water[:, None], 4, axis=1))
    ds = xr.Dataset(data, coords={
        "sample": np.array(names),
        "time": np.arange(4, dtype=np.int64),
        "band": np.array([RELEASE_BAND_NAMES[b] for b in bands]),
        "y": np.arange(size, dtype=np.int64),
        "x": np.arange(size, dtype=np.int64),
    })
    encoding = {
        "bands": {"chunks": (1, 4, len(bands), size, size)},
        # Integers since the epoch, whatever the dates: the same units in every file.
        "time_": {"units": "nanoseconds since 1970-01-01", "calendar": "proleptic_gregorian", "dtype": "int64"},
    }
    if not s1:
        encoding["cloud_mask"] = {"chunks": (1, 4, size, size)}
    if form == "coordinates":
        ds = ds.assign_coords(band=np.array(list(bands)),
                              crs=("sample", np.array([f"EPSG:{loc.footprint.epsg}" for loc in locs])))
        ds = ds.set_coords([name for name in ds.data_vars if name not in ("bands", "cloud_mask")])
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
