"""Small, realistic Sentinel-1/Sentinel-2 archives in the published file layouts.

One writer per layout the pipeline reads; each module is named as the reader in
:mod:`pipeline.sources` it feeds. The published facts they are written from (bands,
folders, offsets, class names) are stated in ``published``, with their sources, and
never imported from the readers, so that a reader drifting from the published format
fails its tests:

* :func:`make_ssl4eo_zarr` (``ssl4eo_zarr``): SSL4EO-S12 v1.1, zipped Zarr v2 stores of 4-season cubes.
* :func:`make_ssl4eo_tiff` (``ssl4eo_tiff``): SSL4EO-S12 v1, one GeoTIFF per band, season and modality.
* :func:`make_bigearthnet` (``bigearthnet``): BigEarthNet v2 (reBEN), GeoTIFF patches plus ``metadata.parquet``.
* :func:`make_sen12ms` (``sen12ms``): SEN12MS, multi-band GeoTIFF triplets (s1, s2, lc) plus the split lists.
* :func:`make_ssl4eo_wds` (``ssl4eo_wds``): SSL4EO-S12 v1.1 as served today, WebDataset tars of zipped Zarr members.
* :func:`make_terramesh` (``terramesh``): TerraMesh, the same member format with one time step, two subsets.

Every location gets a land-cover map (``scene``: smooth random blobs over
:data:`LAND_COVER_CLASSES`) that drives both modalities: each class has a
Sentinel-2 spectrum that follows the seasons and a Sentinel-1 backscatter
(with multiplicative speckle), so a model has something to learn and
BigEarthNet labels can be read back from the pixels. ``geo`` places the
locations on UTM grids and names their acquisitions as the published products.

Everything is a pure function of ``seed`` and the location id: the same
arguments give byte-identical files (the zip entries carry a fixed date).

Command line (``cli``)::

    python -m pipeline.synthetic {ssl4eo-zarr,ssl4eo-wds,terramesh,...} OUTDIR [--n N] [--size S] [--seed K]
"""

from pipeline.synthetic.bigearthnet import (
    BIGEARTHNET_LABEL_OF_CLASS,
    BIGEARTHNET_S2_BANDS,
    BIGEARTHNET_SPLITS,
    LABEL_MIN_FRACTION,
    bigearthnet_labels,
    make_bigearthnet,
)
from pipeline.synthetic.cli import main
from pipeline.synthetic.published import (
    BIGEARTHNET_19_CLASSES,
    S1_BANDS,
    S2_L1C_BANDS,
    S2_L2A_BANDS,
    S2_RESOLUTION_M,
)
from pipeline.synthetic.geo import Acquisitions, Footprint, Location, footprint_at, utm_epsg
from pipeline.synthetic.scene import (
    LAND_COVER_CLASSES,
    SEASONS,
    Scene,
    block_mean,
    class_fractions,
    draw_scene,
    render_s1,
    render_s2,
    resample_to_10m,
    to_native_resolution,
)
from pipeline.synthetic.sen12ms import SEN12MS_IGBP_OF_CLASS, make_sen12ms, sen12ms_igbp
from pipeline.synthetic.ssl4eo_tiff import make_ssl4eo_tiff
from pipeline.synthetic.ssl4eo_wds import SSL4EO_WDS_PRODUCTS, make_ssl4eo_wds
from pipeline.synthetic.ssl4eo_zarr import SSL4EO_ZARR_PRODUCTS, make_ssl4eo_zarr
from pipeline.synthetic.terramesh import TERRAMESH_SUBSETS, make_terramesh
from pipeline.synthetic.wds_zarr import DEFECTS as WDS_DEFECTS

__all__ = [
    "SEN12MS_IGBP_OF_CLASS", "make_sen12ms", "sen12ms_igbp",
    "Acquisitions", "BIGEARTHNET_19_CLASSES", "BIGEARTHNET_LABEL_OF_CLASS", "BIGEARTHNET_S2_BANDS",
    "BIGEARTHNET_SPLITS", "Footprint", "LABEL_MIN_FRACTION", "LAND_COVER_CLASSES", "Location", "S1_BANDS",
    "S2_L1C_BANDS", "S2_L2A_BANDS", "S2_RESOLUTION_M", "SEASONS", "SSL4EO_WDS_PRODUCTS", "SSL4EO_ZARR_PRODUCTS",
    "Scene", "TERRAMESH_SUBSETS", "WDS_DEFECTS", "bigearthnet_labels", "block_mean", "class_fractions", "draw_scene",
    "footprint_at", "main", "make_bigearthnet", "make_ssl4eo_tiff", "make_ssl4eo_wds", "make_ssl4eo_zarr",
    "make_terramesh", "render_s1", "render_s2", "resample_to_10m", "to_native_resolution", "utm_epsg",
]
