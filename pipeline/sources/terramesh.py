"""TerraMesh: SSL4EO-S12 v1.1 and MajorTOM-Core locations in one WebDataset release, one time step each.

Layout (``ibm-esa-geospatial/TerraMesh`` on Hugging Face)::

    {train,val}/{S1GRD,S1RTC,S2L1C,S2L2A,S2RGB,DEM,NDVI,LULC}/{majortom,ssl4eos12}_shard_NNNNNN.tar
        <key>.zarr.zip        one location: bands (time=1, band, y=264, x=264), center_lat, center_lon, time, ...

From the release's loader (``split_files`` in terramesh.py): majortom shards 000001-000793
and ssl4eos12 shards 000794-000889 in train, majortom 000001-000008 and ssl4eos12 000009
in val; S1GRD holds only ssl4eos12 shards and S1RTC only majortom shards ("each sample
only includes one Sentinel-1 version (S1GRD or S1RTC)", TerraMesh card), so the S1
partner of an S2 tar is looked up by its subset. The member format is the SSL4EO-S12
release's (`pipeline.sources.zarr_member`) with a time dimension of 1.

One sample is one member: key ``<member key>_t0``; the shard json adds ``s1_modality``
(S1GRD or S1RTC), since the two S1 processings differ (terrain flattening).
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.sources.wds_zarr import ZarrWebDataset

S1_FOLDERS = {"ssl4eos12": "S1GRD", "majortom": "S1RTC"}
"""The S1 folder of each subset."""
SHARD_NAME = "{subset}_shard_{number:06d}.tar"
_SHARD = re.compile(r"^(?P<subset>majortom|ssl4eos12)_shard_\d{6}\.tar$")


class TerraMesh(ZarrWebDataset):
    name = "terramesh"
    version = "TerraMesh"
    shard_file = _SHARD
    layout = ("{train,val}/{S1GRD,S1RTC,S2L1C,S2L2A}/{majortom,ssl4eos12}_shard_NNNNNN.tar "
              "of <key>.zarr.zip members")
    default_times = 1
    s2_offset_note = ("stored as published; the sources disagree whether values carry +1000 (the TerraMesh paper says "
                      "it is applied to pre-2022 data, the loader's statistics rule it out on every pixel)")

    def s1_folder(self, shard: str) -> str:
        return S1_FOLDERS[_SHARD.match(shard)["subset"]]

    def sample_meta(self, shard: str) -> dict[str, Any]:
        return {"s1_modality": self.s1_folder(shard)}
