"""Archive readers, one module per published layout."""

from pipeline.sources.base import Rejection, Source, SourceOptions, WorkItem
from pipeline.sources.bigearthnet import BigEarthNet
from pipeline.sources.ssl4eo_tiff import SSL4EOTiff
from pipeline.sources.ssl4eo_zarr import SSL4EOZarr

SOURCES: dict[str, type[Source]] = {
    SSL4EOZarr.name: SSL4EOZarr,
    SSL4EOTiff.name: SSL4EOTiff,
    BigEarthNet.name: BigEarthNet,
}

__all__ = ["SOURCES", "Rejection", "Source", "SourceOptions", "WorkItem"]
