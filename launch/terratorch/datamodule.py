"""Labelled shards of this project for TerraTorch's tasks: a Lightning datamodule over `shard_samples`.

    data:
      class_path: launch.terratorch.datamodule.ShardDataModule
      init_args: {train_manifest: .../train/manifest.json, val_manifest: ..., test_manifest: ..., batch_size: 32}

Batches are ``{"image": {"s1": (B, 2, H, W), "s2": (B, C, H, W)}, "label": (B, K)}`` float32, images in the
stored units (dB, reflectance x 10000: the ``fusmae`` backbones normalise them with their export's
statistics) and labels the json's ``label_vector`` (BigEarthNet's 19 classes), the shape of
``MultiLabelClassificationTask``'s batches. Importing this module registers the ``fusmae*`` backbones, so a
YAML naming this datamodule can name them (jsonargparse imports the class while it parses the config).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator, Optional

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

import launch.terratorch.backbone  # noqa: F401  (registers the backbones)
from launch.terratorch.shard_dataset import shard_samples, to_example
from pipeline.manifest import load_manifest


class ShardDataModule(LightningDataModule):
    """Train / val / test splits, each a shard set written by ``pipeline.preprocess`` (its manifest.json)."""

    def __init__(self, train_manifest: str, val_manifest: str, test_manifest: Optional[str] = None,
                 batch_size: int = 32, eval_batch_size: Optional[int] = None, num_workers: int = 0,
                 shuffle_buffer: int = 256, seed: int = 0, label: str = "label_vector",
                 storage_options: Optional[dict[str, Any]] = None) -> None:
        """shuffle_buffer: samples shuffled in the training split (0: manifest order); label: the json
        field holding each sample's multi-hot vector."""
        super().__init__()
        self.manifests = {"fit": train_manifest, "validate": val_manifest, "test": test_manifest}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.label = label
        self.storage_options = dict(storage_options or {})

    def _loader(self, split: str, train: bool) -> DataLoader:
        url = self.manifests[split]
        if not url:
            raise ValueError(f"ShardDataModule: no {split} manifest given")
        manifest = load_manifest(url, self.storage_options)
        # training: a seeded shard order that changes every epoch (webdataset's detshuffle) and a sample buffer
        samples = shard_samples(manifest, self.storage_options, self.shuffle_buffer if train else 0, self.seed)
        # a plain stage, not wds.map (which copies ``__key__`` back: TerraTorch passes every batch key but
        # image / label / filename to the model)
        dataset = samples.compose(partial(_examples, label=self.label))
        return DataLoader(dataset, batch_size=self.batch_size if train else self.eval_batch_size,
                          num_workers=self.num_workers, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("fit", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validate", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


def _examples(src: Iterator[dict[str, Any]], label: Optional[str]) -> Iterator[dict[str, Any]]:
    for sample in src:
        yield to_example(sample, label)
