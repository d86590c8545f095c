"""The pretrained encoder as a plain file: safetensors weights and the model config beside them.

``encoder.safetensors`` holds the encoder's parameters (float32, names as in
``FusMAE.encoder_state_dict``); ``encoder_config.json`` holds ``model`` (the
FusMAEConfig fields) and ``data`` (band names and the normalisation statistics
of the pretraining shards). Loading needs neither DeepSpeed nor this project's
training code: ``FusMAE(FusMAEConfig(**cfg["model"])).load_encoder_state_dict(...)``.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from model import FusMAE, FusMAEConfig
from pipeline.storage import put_atomic, read_bytes, url_to_fs, write_bytes_atomic

WEIGHTS = "encoder.safetensors"
CONFIG = "encoder_config.json"


def export_encoder(state: dict[str, torch.Tensor], model_cfg: FusMAEConfig, data_info: dict[str, Any], url: str,
                   storage_options: Optional[dict[str, Any]] = None, extra: Optional[dict[str, Any]] = None) -> str:
    """Write ``encoder.safetensors`` then ``encoder_config.json`` (the config last: its presence means complete)."""
    fs, root = url_to_fs(url, storage_options or {})
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state.items()}
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, WEIGHTS)
        save_file(tensors, local, metadata={"format": "pt", "model": "fusmae-encoder"})
        put_atomic(fs, local, f"{root}/{WEIGHTS}")
    meta = {"model": model_cfg.to_dict(), "data": data_info, **(extra or {})}
    write_bytes_atomic(fs, f"{root}/{CONFIG}", json.dumps(meta, indent=1, sort_keys=True).encode())
    return f"{url.rstrip('/')}/{WEIGHTS}"


def load_encoder(url: str, storage_options: Optional[dict[str, Any]] = None) -> tuple[FusMAE, dict[str, Any]]:
    """A FusMAE whose encoder holds the exported weights (decoder left at its initialisation), and the metadata."""
    fs, root = url_to_fs(url, storage_options or {})
    if root.endswith(".safetensors"):
        root = root.rsplit("/", 1)[0]
    meta = json.loads(read_bytes(fs, f"{root}/{CONFIG}"))
    net = FusMAE(FusMAEConfig(**meta["model"]))
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, WEIGHTS)
        fs.get_file(f"{root}/{WEIGHTS}", local)
        net.load_encoder_state_dict(load_file(local), strict=True)
    return net, meta
