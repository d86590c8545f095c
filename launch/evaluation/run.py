"""One evaluation run: `evaluate(cfg)` and the results document it writes.

    eval.pretrained -> load_pretrained -> (checked against the shards) -> LinearProbe | FineTuner
                    -> the task's metrics on the test split (`task`) -> <run.dir>/results.json + a table
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np
import torch

from launch.config import EvalConfig, save_config
from launch.distributed import Runtime
from launch.evaluation.bands import describe as describe_bands
from launch.evaluation.data import PROCESS_CACHE, EvalData, MemoryCache, SplitCache
from launch.evaluation.finetune import FineTuner
from launch.evaluation.linear_probe import LinearProbe
from launch.evaluation.metrics import format_table
from launch.evaluation.pretrained import RUNTIME_FIELDS, Pretrained, load_pretrained
from pipeline.storage import redact_url, set_retry_window, url_to_fs, write_bytes_atomic

RESULTS = "results.json"


def results_document(cfg: EvalConfig, rt: Runtime, pretrained: Pretrained, out: dict[str, Any]) -> dict[str, Any]:
    """The test metrics, the settings that produced them and the training history (results.json)."""
    e = cfg.eval
    test = out["test"]
    config = cfg.to_dict(redacted=True)
    if not e.random_init:  # the architecture came from the checkpoint (settings.model); model.* was not used
        config["model"] = {k: config["model"][k] for k in RUNTIME_FIELDS}
    settings = {
        "protocol": e.protocol,
        "label_fraction": e.label_fraction,
        "seed": e.seed,
        "pretrained": pretrained.source,
        "pretrained_info": pretrained.describe(),
        "model": pretrained.cfg.to_dict(),
        "pool": pretrained.cfg.pool,
        "bands": describe_bands(pretrained.bands),
        "image_size": cfg.data.image_size,
        "epochs": e.epochs,
        "best_epoch": out["best_epoch"],
        "val_map_macro": out["val_map_macro"],
        "task": e.task,
        "selected_by": out["selected_by"],
        "val_score": out["val_score"],
        "train_subset": out["subset"],
        "optimizer": e.optimizer,
        "lr": out["lr"],
        "batch_size": out["batch_size"],
        "weight_decay": e.weight_decay,
        "world_size": rt.world_size,
        "config": config,
    }
    if e.protocol == "finetune":
        settings.update(layer_decay=e.layer_decay, encoder_lr_scale=e.encoder_lr_scale, augment=cfg.data.augment)
    extra = {"accuracy": test["accuracy"]} if "accuracy" in test else {}
    return {
        **extra,
        "map_macro": test["map_macro"], "map_micro": test["map_micro"], "f1": test["f1"],
        "f1_macro": test["f1_macro"], "per_class_ap": test["per_class_ap"], "per_class_f1": test["per_class_f1"],
        "num_test_samples": test["num_samples"], "test_classes_present": test["classes_present"],
        "settings": settings, "history": out["history"],
    }


def evaluate(cfg: EvalConfig, memory: Optional[MemoryCache] = None) -> Optional[dict[str, Any]]:
    """Run the evaluation ``cfg`` describes; returns the results document on rank 0 (None elsewhere, and
    for a fine-tuning run stopped by eval.stop_at_epoch). Writes ``<run.dir>/results.json`` (atomically)
    and prints a table. ``memory``: where split outputs are kept between calls (default: this process's)."""
    set_retry_window(cfg.storage.retry_window_s)
    rt = Runtime.start(always=False)
    torch.manual_seed(cfg.eval.seed)
    np.random.seed(cfg.eval.seed)
    os.makedirs(cfg.run.dir, exist_ok=True)
    if rt.is_main:
        save_config(cfg, os.path.join(cfg.run.dir, "eval_config.yaml"))
    data = EvalData(cfg, rt)
    pretrained = load_pretrained(cfg, data.manifests, rt)
    data.bands = pretrained.bands
    cache = SplitCache(cfg, rt, PROCESS_CACHE if memory is None else memory)
    if cfg.eval.protocol == "linear":
        out = LinearProbe(cfg, rt, data, pretrained, cache).run()
    else:
        out = FineTuner(cfg, rt, data, pretrained, cache).train()
    rt.barrier()
    if out is None or not rt.is_main:
        return None
    doc = results_document(cfg, rt, pretrained, out)
    path = os.path.join(cfg.run.dir, RESULTS)
    fs, local = url_to_fs(path)
    write_bytes_atomic(fs, local, json.dumps(doc, indent=1).encode())
    title = (f"{cfg.eval.protocol} evaluation of {pretrained.source} on {redact_url(cfg.data.test_manifest)} "
             f"(label fraction {cfg.eval.label_fraction}, seed {cfg.eval.seed}, best epoch {out['best_epoch']}, "
             f"val {out['selected_by']} {out['val_score']:.4f})")
    print(format_table(out["test"], title), flush=True)
    print(f"results written to {path}", flush=True)
    return doc
