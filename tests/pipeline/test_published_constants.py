"""The readers state the published formats as the generator does (issue 15, item 7).

The test archives (``pipeline.synthetic``) are written from the facts in
``pipeline/synthetic/published.py``, each copied from the dataset's own documentation
(source named beside it there). Every reader in ``pipeline.sources`` states the same
facts for itself; these checks fail when one drifts from the published format, which
the archive tests alone cannot see if both sides move together.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.sources import base, bigearthnet, sen12ms, ssl4eo_tiff, ssl4eo_wds, ssl4eo_zarr, terramesh, wds_zarr
from pipeline.sources import zarr_member
from pipeline.synthetic import published
from pipeline.synthetic.wds_zarr import DEFECTS

# (reader's constant, generator's published literal), named by the reader's module and name.
PAIRS = {
    "base.S2_L1C_BANDS": (base.S2_L1C_BANDS, published.S2_L1C_BANDS),
    "base.S2_L2A_BANDS": (base.S2_L2A_BANDS, published.S2_L2A_BANDS),
    "base.S2_RESOLUTION_M": (base.S2_RESOLUTION_M, published.S2_RESOLUTION_M),
    "base.S2_NODATA": (base.S2_NODATA, published.S2_NODATA),
    "base.S1_BANDS": (base.S1_BANDS, published.S1_BANDS),
    "ssl4eo_tiff.S1_DIR": (ssl4eo_tiff.S1_DIR, published.SSL4EO_TIFF_S1_DIR),
    "ssl4eo_tiff.S2_DIRS": (ssl4eo_tiff.S2_DIRS, published.SSL4EO_TIFF_S2_DIRS),
    "ssl4eo_zarr.S1_PRODUCT": (ssl4eo_zarr.S1_PRODUCT, published.SSL4EO_ZARR_S1_PRODUCT),
    "ssl4eo_zarr.S2_PRODUCTS": (ssl4eo_zarr.S2_PRODUCTS, published.SSL4EO_ZARR_S2_PRODUCTS),
    "ssl4eo_zarr.FILE_NAME": (ssl4eo_zarr.FILE_NAME, published.SSL4EO_ZARR_FILE_NAME),
    "ssl4eo_zarr.S2_OFFSET": (ssl4eo_zarr.S2_OFFSET, published.SSL4EO_ZARR_S2_OFFSET),
    "wds_zarr.S2_LEVEL_FOLDERS": (wds_zarr.S2_LEVEL_FOLDERS, published.WDS_S2_LEVEL_FOLDERS),
    "ssl4eo_wds.S1_FOLDER": (ssl4eo_wds.S1_FOLDER, published.SSL4EO_WDS_S1_FOLDER),
    "ssl4eo_wds.SHARD_NAME": (ssl4eo_wds.SHARD_NAME, published.SSL4EO_WDS_SHARD_NAME),
    "ssl4eo_wds.TIMES": (ssl4eo_wds.TIMES, published.SSL4EO_WDS_TIMES),
    "terramesh.S1_FOLDERS": (terramesh.S1_FOLDERS, published.TERRAMESH_S1_FOLDERS),
    "terramesh.SHARD_NAME": (terramesh.SHARD_NAME, published.TERRAMESH_SHARD_NAME),
    "zarr_member.MEMBER_EXT": (zarr_member.MEMBER_EXT, published.MEMBER_EXT),
    "zarr_member.variables": (
        (zarr_member.BANDS, zarr_member.BAND, zarr_member.TIME, zarr_member.CENTER_LAT, zarr_member.CENTER_LON,
         zarr_member.CRS, zarr_member.FILE_ID, zarr_member.SAMPLE, zarr_member.CLOUD_MASK),
        (published.BANDS, published.BAND, published.TIME, published.CENTER_LAT, published.CENTER_LON,
         published.CRS, published.FILE_ID, published.SAMPLE, published.CLOUD_MASK)),
    "bigearthnet.BIGEARTHNET_19_CLASSES": (bigearthnet.BIGEARTHNET_19_CLASSES, published.BIGEARTHNET_19_CLASSES),
    "bigearthnet.S1_ROOT": (bigearthnet.S1_ROOT, published.BIGEARTHNET_S1_ROOT),
    "bigearthnet.S2_ROOT": (bigearthnet.S2_ROOT, published.BIGEARTHNET_S2_ROOT),
    "bigearthnet.METADATA": (bigearthnet.METADATA, published.BIGEARTHNET_METADATA),
    "bigearthnet.SPLITS": (bigearthnet.SPLITS, published.BIGEARTHNET_SPLITS),
    "bigearthnet.S2_FILE_BANDS": (bigearthnet.S2_FILE_BANDS, published.BIGEARTHNET_S2_FILE_BANDS),
    "sen12ms.SEASON_FOLDERS": (sen12ms.SEASON_FOLDERS, published.SEN12MS_SEASON_FOLDERS),
    "sen12ms.FILE_NAME": (sen12ms.FILE_NAME, published.SEN12MS_FILE_NAME),
    "sen12ms.SPLIT_FILES": (sen12ms.SPLIT_FILES, published.SEN12MS_SPLIT_FILES),
    "sen12ms.LC_BANDS": (sen12ms.LC_BANDS, published.SEN12MS_LC_BANDS),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_reader_states_the_published_value(name):
    reader, generator = PAIRS[name]
    assert reader == generator, f"pipeline.sources.{name} differs from the published format the generator writes"


def test_published_band_tables_are_consistent():
    # Internal checks of the literals against each other (ESA: L2A = L1C without B10; every band has a GSD).
    assert published.S2_L2A_BANDS == tuple(b for b in published.S2_L1C_BANDS if b != "B10")
    assert set(published.S2_RESOLUTION_M) == set(published.S2_L1C_BANDS)
    assert len(published.BIGEARTHNET_19_CLASSES) == 19 == len(set(published.BIGEARTHNET_19_CLASSES))
    assert [b.replace("0", "") for b in published.BIGEARTHNET_S2_FILE_BANDS] == list(published.S2_L2A_BANDS)


def test_defects_cause_the_readers_quarantine_reasons():
    # The generator's inventory counts quarantine by these strings; the readers must write the same ones.
    assert DEFECTS == {"unreadable": base.UNREADABLE, "missing_partner": base.MISSING_PARTNER,
                       "wrong_shape": base.WRONG_SHAPE, "non_finite": base.NON_FINITE, "all_nodata": base.ALL_NODATA}


def test_sen12ms_patch_ids_agree():
    from pipeline.synthetic.sen12ms import patch_id as inventory_id

    assert inventory_id("ROIs1158_spring", 1, 30) == sen12ms.patch_id("ROIs1158_spring", "1", "30")


def test_generator_imports_no_reader():
    # In a fresh interpreter: importing the whole generator loads nothing from pipeline.sources.
    code = ("import sys, pipeline.synthetic; "
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.sources')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
