"""Archive readers, one module per published layout."""

from pipeline.sources.base import Rejection, Source, SourceOptions, WorkItem
from pipeline.sources.bigearthnet import BigEarthNet
from pipeline.sources.sen12ms import SEN12MS
from pipeline.sources.ssl4eo_tiff import SSL4EOTiff
from pipeline.sources.ssl4eo_wds import SSL4EOWebDataset
from pipeline.sources.ssl4eo_zarr import SSL4EOZarr
from pipeline.sources.terramesh import TerraMesh

SOURCES: dict[str, type[Source]] = {
    SSL4EOZarr.name: SSL4EOZarr,
    SSL4EOTiff.name: SSL4EOTiff,
    BigEarthNet.name: BigEarthNet,
    SEN12MS.name: SEN12MS,
    SSL4EOWebDataset.name: SSL4EOWebDataset,
    TerraMesh.name: TerraMesh,
}

__all__ = ["SOURCES", "Rejection", "Source", "SourceOptions", "WorkItem"]
