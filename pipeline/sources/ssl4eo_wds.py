"""SSL4EO-S12 v1.1 as its dataset repository serves it today: WebDataset tars of per-location zipped Zarr stores.

Layout (``embed2scale/SSL4EO-S12-v1.1`` on Hugging Face)::

    {train,val}/{S1GRD,S2L1C,S2L2A,S2RGB,...}/ssl4eos12_shard_NNNNNN.tar
        <key>.zarr.zip        one location: bands (time=4, band, y=264, x=264), center_lat, center_lon, time, ...

Shards 000001-000477 in train and 000001-000005 in val (``split_files`` in the release's
loader, ssl4eos12_dataset.py of DLR-MF-DAS/SSL4EO-S12-v1.1), about 512 locations each;
every modality folder has the same shard numbers and, in each shard, the same keys.
The member format, and why its S2 values carry no +1000 offset, are in
`pipeline.sources.zarr_member`; the reading is `pipeline.sources.wds_zarr`.

One sample is one location at one of its four time steps: key ``<member key>_t<t>``.
"""

from __future__ import annotations

import re

from pipeline.sources.wds_zarr import ZarrWebDataset

S1_FOLDER = "S1GRD"
SHARD_NAME = "ssl4eos12_shard_{number:06d}.tar"
TIMES = 4
"""Time steps per location ("four timestamps each", DLR README)."""


class SSL4EOWebDataset(ZarrWebDataset):
    name = "ssl4eo-wds"
    version = "SSL4EO-S12 v1.1 (WebDataset)"
    shard_file = re.compile(r"^ssl4eos12_shard_\d{6}\.tar$")
    layout = "{train,val}/{S1GRD,S2L1C,S2L2A}/ssl4eos12_shard_NNNNNN.tar of <key>.zarr.zip members"
    default_times = TIMES
    s2_offset_note = "none in this release (stored as published: reflectance x 10000)"

    def s1_folder(self, shard: str) -> str:
        return S1_FOLDER
