"""The published facts the test archives are written from, stated here, never imported from the readers.

The generator exists to test the readers in :mod:`pipeline.sources`; if it took its band
lists, folder names and offsets from them, a reader that drifted from the published format
would drift the generator with it and every test would still pass. So each fact is written
out here from the dataset's own documentation (named beside it), the other generator modules
import it from here, and ``tests/pipeline/test_published_constants.py`` checks that the
readers state the same values.
"""

from __future__ import annotations

# --- Sentinel-2 MSI and Sentinel-1 SAR -----------------------------------------------------------

S2_L1C_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
"""ESA Sentinel-2 User Handbook, MSI spectral bands: 13 bands, B8A (narrow NIR) after B8, as L1C ships them."""
S2_L2A_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
"""ESA Sentinel-2 L2A (Sen2Cor) surface reflectance: the L1C bands without B10 (cirrus), 12 bands."""
S2_RESOLUTION_M = {
    "B1": 60, "B2": 10, "B3": 10, "B4": 10, "B5": 20, "B6": 20, "B7": 20, "B8": 10,
    "B8A": 20, "B9": 60, "B10": 60, "B11": 20, "B12": 20,
}
"""ESA Sentinel-2 User Handbook, MSI spatial resolution: 10 m (B2-B4, B8), 20 m (B5-B7, B8A, B11, B12),
60 m (B1, B9, B10); BigEarthNet's band table (TFDS catalog "bigearthnet") lists the same per band."""
S2_NODATA = 0
"""ESA Sentinel-2 Products Specification: NODATA pixels hold 0 in L1C and L2A digital numbers."""
S1_BANDS = ("VV", "VH")
"""Sentinel-1 IW dual polarisation (1SDV): VV then VH, the S1 bands of SSL4EO-S12, BigEarthNet and SEN12MS."""

# --- SSL4EO-S12 v1 (GeoTIFF, zhu-xlab/SSL4EO-S12; torchgeo SSL4EOS12 splits "s1", "s2c", "s2a") ----------

SSL4EO_TIFF_S1_DIR = "s1"
SSL4EO_TIFF_S2_DIRS = {"L1C": "s2c", "L2A": "s2a"}

# --- SSL4EO-S12 v1.1 Zarr chunk files (DLR-MF-DAS/SSL4EO-S12-v1.1 README) --------------------------

SSL4EO_ZARR_S1_PRODUCT = "S1GRD"
SSL4EO_ZARR_S2_PRODUCTS = {"L1C": "S2L1C", "L2A": "S2L2A"}
SSL4EO_ZARR_FILE_NAME = "ssl4eos12_{split}_seasonal_data_{number:06d}.zarr.zip"
SSL4EO_ZARR_S2_OFFSET = 1000
"""The README's S2 statistics (S2L1C B01 mean 2607.3) are reflectance x 10000 + 1000."""

# --- the WebDataset releases: SSL4EO-S12 v1.1 (embed2scale/SSL4EO-S12-v1.1) and TerraMesh -----------

WDS_S2_LEVEL_FOLDERS = {"L1C": "S2L1C", "L2A": "S2L2A"}
"""The S2 modality folders of both releases' cards and loaders."""
SSL4EO_WDS_S1_FOLDER = "S1GRD"
SSL4EO_WDS_SHARD_NAME = "ssl4eos12_shard_{number:06d}.tar"
SSL4EO_WDS_TIMES = 4
"""Time steps per location: "four timestamps each" (DLR README)."""
TERRAMESH_S1_FOLDERS = {"ssl4eos12": "S1GRD", "majortom": "S1RTC"}
"""TerraMesh card: "each sample only includes one Sentinel-1 version (S1GRD or S1RTC)", by subset."""
TERRAMESH_SHARD_NAME = "{subset}_shard_{number:06d}.tar"
"""TerraMesh loader's ``split_files``: majortom_shard_NNNNNN.tar, ssl4eos12_shard_NNNNNN.tar."""

# One location's member: the variables both loaders read (``zarr_metadata_decoding`` in ssl4eos12_dataset.py,
# DLR-MF-DAS/SSL4EO-S12-v1.1, and terramesh.py, ibm-esa-geospatial/TerraMesh), and the chunk-file release's
# extra variables (crs, file_id, sample) in the DLR README's xarray listing.
MEMBER_EXT = "zarr.zip"
BANDS = "bands"
BAND = "band"
TIME = "time"
CENTER_LAT, CENTER_LON = "center_lat", "center_lon"
CRS = "crs"
FILE_ID = "file_id"
SAMPLE = "sample"
CLOUD_MASK = "cloud_mask"

# --- BigEarthNet v2 / reBEN (Clasen et al. 2024; zenodo 10891137; torchgeo BigEarthNetV2) -------------

BIGEARTHNET_S1_ROOT = "BigEarthNet-S1"
BIGEARTHNET_S2_ROOT = "BigEarthNet-S2"
BIGEARTHNET_METADATA = "metadata.parquet"
BIGEARTHNET_SPLITS = ("train", "validation", "test")
"""The values of metadata.parquet's ``split`` column."""
BIGEARTHNET_S2_FILE_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
"""The 12 L2A band suffixes of the patch file names (``<patch_id>_B01.tif``), in S2_L2A_BANDS order."""
BIGEARTHNET_19_CLASSES = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)
"""BigEarthNet 19-class nomenclature in its published order (Sumbul et al. 2021, Table; torchgeo's class_sets[19])."""

# --- SEN12MS (Schmitt et al. 2019; schmitt-muc/SEN12MS; torchgeo SEN12MS) ------------------------

SEN12MS_SEASON_FOLDERS = ("ROIs1158_spring", "ROIs1868_summer", "ROIs1970_fall", "ROIs2017_winter")
SEN12MS_FILE_NAME = "{roi}_{modality}_{scene}_p{patch}.tif"
"""In folder ``{modality}_{scene}``, e.g. ROIs1158_spring/s2_1/ROIs1158_spring_s2_1_p30.tif."""
SEN12MS_SPLIT_FILES = {"train": "train_list.txt", "test": "test_list.txt"}
"""The classification split lists of schmitt-muc/SEN12MS splits/."""
SEN12MS_LC_BANDS = ("IGBP", "LCCS_LC", "LCCS_LU", "LCCS_SH")
"""The lc file's 4 bands: IGBP, LCCS land cover, LCCS land use, LCCS surface hydrology (torchgeo's docstring)."""
