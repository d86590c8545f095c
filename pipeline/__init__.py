"""Preprocessing of Sentinel-1/Sentinel-2 archives into WebDataset shards (Ray jobs)."""

__version__ = "0.1.0"
