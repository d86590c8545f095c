"""Fine-tuning the exported encoder with TerraTorch (the optional extra: ``pip install -e .[terratorch]``).

- `backbone`: registers ``fusmae``, ``fusmae_tiny``, ``fusmae_vit_s``, ``fusmae_vit_b`` and ``fusmae_vit_l``
  in TerraTorch's backbone registry (importing it needs terratorch);
- `shard_dataset`: the project's shards as a plain `webdataset` pipeline (needs webdataset only);
- `datamodule`: a Lightning datamodule over labelled shards for TerraTorch's tasks; importing it registers
  the backbones too, so a YAML that names it can name them (``configs/terratorch/``).

This package imports nothing heavy itself: `shard_dataset` works without terratorch installed.
"""

BACKBONES = ("fusmae", "fusmae_tiny", "fusmae_vit_s", "fusmae_vit_b", "fusmae_vit_l")
"""The names `backbone` registers."""
