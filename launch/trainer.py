"""The pretraining loop: DeepSpeed engine, streaming loader, checkpoints in object storage.

`Trainer.train()` runs `train_step()` until `train.max_steps`; each step is
`grad_accum_steps` micro batches (DeepSpeed steps the optimizer at the
accumulation boundary). Everything a resumed run needs is gathered in one
place, `_client_state()`: the step, the loader position, the run id and the
resolved config (credentials redacted).
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from typing import Any, Optional

import torch

from launch import distributed
from launch.augment import DeviceAugment
from launch.checkpoint import CheckpointStore, Committed
from launch.config import Config, ConfigError, deepspeed_config, save_config
from launch.export import export_encoder
from launch.loader import ShardLoader, load_manifest
from launch.metrics import MetricsLogger
from launch.pictures import save_reconstructions
from model import FusMAE
from model.flops import estimate_flops_per_sample
from pipeline.storage import redact_url

log = logging.getLogger("launch.trainer")


def lr_lambda(cfg: Config):
    """Linear warm-up to train.lr, then cosine decay to train.min_lr at train.max_steps (as a factor of lr)."""
    t = cfg.train
    floor = t.min_lr / t.lr

    def factor(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(model: FusMAE, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on tokens, norms and biases (MAE's recipe)."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    def __init__(self, cfg: Config):
        import deepspeed

        self.cfg = cfg
        self.rank, self.world_size, self.local_rank = distributed.init()
        self.has_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", self.local_rank) if self.has_gpu else torch.device("cpu")
        torch.manual_seed(cfg.train.seed)
        os.makedirs(cfg.run.dir, exist_ok=True)
        if self.rank == 0:
            save_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))

        self.manifest = load_manifest(cfg.data.manifest, cfg.data.storage_options)
        self._check_data_matches_model()
        self.model = FusMAE(cfg.model)

        # Where to resume from must be known before the engine exists (universal loading is an engine option).
        self.store: Optional[CheckpointStore] = None
        self.resume_from: Optional[tuple[CheckpointStore, Committed]] = None
        self.run_id = distributed.broadcast_object(CheckpointStore.new_run_id() if self.rank == 0 else None)
        if cfg.checkpoint.dir:
            staging = os.path.join(cfg.run.dir, "staging")
            self.store = CheckpointStore(cfg.checkpoint.dir, staging, self.rank, self.world_size, cfg.checkpoint.keep,
                                         cfg.checkpoint.storage_options)
            self.store.run_id = self.run_id
        self.resume_from = distributed.broadcast_object(self._resolve_resume() if self.rank == 0 else None)
        universal = bool(self.resume_from and self.resume_from[1].world_size != self.world_size)

        ds_config = deepspeed_config(cfg, self.world_size, self.has_gpu)
        if universal:
            ds_config["checkpoint"] = {"load_universal": True}
        use_torch_adam = cfg.deepspeed.torch_adam if cfg.deepspeed.torch_adam is not None else not self.has_gpu
        groups = param_groups(self.model, cfg.train.weight_decay)
        if use_torch_adam:
            optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), fused=self.has_gpu)
        else:  # DeepSpeed's fused Adam, configured from the same schema
            optimizer = None
            ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.train.lr, "betas": list(cfg.train.betas),
                                                                  "weight_decay": cfg.train.weight_decay}}
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, model_parameters=groups, optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)), config=ds_config,
        )
        self.dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32

        d = cfg.data
        self.loader = ShardLoader.from_config(d, rank=self.rank, world_size=self.world_size,
                                              micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed)
        self.augment = DeviceAugment(self.manifest, d.image_size).to(self.device)
        self.step = 0
        self.skipped = 0
        if self.resume_from is not None:
            self._load(universal)
        self.samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * self.world_size
        self.metrics = MetricsLogger(
            cfg.run.dir, self.rank, self.world_size, cfg.train.max_steps, self.samples_per_step,
            estimate_flops_per_sample(cfg.model, d.image_size), distributed.device_name(),
            monitor=getattr(self.engine, "monitor", None), resume_step=self.step,
        )
        self._picture_batch = self._fixed_batch()

    # ------------------------------------------------------------------ setup
    def _check_data_matches_model(self) -> None:
        mods = self.manifest.modalities
        m = self.cfg.model
        for key, mod in (("s1_channels", "s1"), ("s2_channels", "s2")):
            have = len(mods[mod]["bands"])
            if getattr(m, key) != have:
                raise ConfigError(f"model.{key}={getattr(m, key)} but the shards of {redact_url(self.cfg.data.manifest)} "
                                  f"hold {have} {mod.upper()} bands {mods[mod]['bands']}")
        size = self.manifest.image_size
        if self.cfg.data.image_size > min(size):
            raise ConfigError(f"data.image_size={self.cfg.data.image_size} is larger than the shards' images {size}")

    def _resolve_resume(self) -> Optional[tuple[CheckpointStore, Committed]]:
        """Rank 0 only: the checkpoint to load, after cleaning what an interrupted run left behind."""
        cfg = self.cfg
        if cfg.resume == "none":
            if self.store is not None and self.store.latest() is not None:
                raise ConfigError(f"checkpoint.dir {redact_url(cfg.checkpoint.dir)} already holds committed "
                                  "checkpoints: pass resume=auto to continue, or choose another checkpoint.dir")
            if self.store is not None:
                self.store.discard_uncommitted(None)
            return None
        if self.store is None and cfg.resume == "auto":
            raise ConfigError("resume=auto needs checkpoint.dir")
        base = self.store or CheckpointStore("memory://unused", os.path.join(cfg.run.dir, "staging"), 0,
                                             self.world_size, cfg.checkpoint.keep)
        found = base.resolve(cfg.resume)
        if self.store is not None and cfg.resume == "auto":
            self.store.discard_uncommitted(found[1].tag if found else None)
        if found is None:
            print(f"resume=auto: no committed checkpoint in {redact_url(cfg.checkpoint.dir)}; starting fresh", flush=True)
        return found

    def _load(self, universal: bool) -> None:
        store, ckpt = self.resume_from
        # One process per host downloads the checkpoint (ZeRO loading reads every rank's partition files);
        # at another world size it also converts it to DeepSpeed's universal format. The others wait.
        folder = os.path.join(self.cfg.run.dir, "staging", f"resume-{distributed.hostname()}")
        tag = ckpt.tag + "_universal" if universal else ckpt.tag
        if self.local_rank == 0:
            store.fetch(ckpt, dest=folder)
            if universal:
                subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                                "--input_folder", os.path.join(folder, ckpt.tag),
                                "--output_folder", os.path.join(folder, tag),
                                "--num_extract_workers", "1", "--num_merge_workers", "1"],
                               check=True, stdout=subprocess.DEVNULL)
        distributed.barrier()
        path, client = self.engine.load_checkpoint(folder, tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt.tag}")
        self.step = int(client["step"])
        self.loader.load_state_dict(client["loader"])
        if self.rank == 0:
            how = f"universal conversion from world size {ckpt.world_size}" if universal else "same world size"
            print(f"resumed from {redact_url(store.url)}/{ckpt.tag} at step {self.step} ({how})", flush=True)

    def _fixed_batch(self) -> Optional[dict[str, Any]]:
        """A few samples, the same on every rank and every run, for the reconstruction pictures."""
        if not self.cfg.checkpoint.dir:  # pictures are drawn at checkpoints only
            return None
        n = min(16, self.manifest.num_samples)
        first = ShardLoader(self.manifest, rank=0, world_size=1, micro_batch_size=n, num_workers=0,
                            seed=0, finite=True, storage_options=self.cfg.data.storage_options)
        batch = next(iter(first))
        # spread over the set (consecutive samples are often the same place at other dates)
        pick = torch.linspace(0, batch["s1"].shape[0] - 1, min(4, batch["s1"].shape[0])).long()
        return {k: (v[pick] if torch.is_tensor(v) else v) for k, v in batch.items()}

    # ------------------------------------------------------------------- loop
    def _client_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "loader": self.loader.state_dict(),
            "run_id": self.run_id,
            "world_size": self.world_size,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "config": self.cfg.to_dict(redacted=True),
            # lets deepspeed.checkpoint.ds_to_universal convert this checkpoint for another world size
            "universal_checkpoint_info": {"universal_checkpoint_version": 0.2},
        }

    def _generator(self, micro: int) -> torch.Generator:
        """Masking noise seeded by (seed, rank, step, micro batch): identical after a resume, no RNG state to save."""
        g = torch.Generator(device=self.device)
        g.manual_seed(hash((self.cfg.train.seed, self.rank, self.step, micro)) & ((1 << 62) - 1))
        return g

    def train_step(self, batches) -> None:
        for micro in range(self.cfg.train.grad_accum_steps):
            batch = next(batches)
            s1, s2, nonfinite = self.augment(batch, self.device)
            out = self.engine(s1.to(self.dtype), s2.to(self.dtype), generator=self._generator(micro))
            self.engine.backward(out.loss)
            self.engine.step()
            self.metrics.accumulate(out.loss, out.loss_s1, out.loss_s2, nonfinite)
        self.skipped = self.loader.skipped["shards"]
        self.step += 1

    def train(self) -> None:
        cfg = self.cfg
        stop = cfg.train.max_steps if cfg.train.stop_at_step is None else min(cfg.train.stop_at_step, cfg.train.max_steps)
        if self.step >= stop:
            print(f"nothing to train: already at step {self.step} (stop at {stop})", flush=True)
        self.engine.train()
        batches = iter(self.loader)
        stall_total = 0.0
        while self.step < stop:
            self.train_step(batches)
            if self.store is not None and (self.step % cfg.checkpoint.every_steps == 0 or self.step == stop):
                stall_total += self.checkpoint()
            if self.step % cfg.train.log_every == 0 or self.step == stop:
                self.metrics.log(self.step, self.scheduler.get_last_lr()[0],
                                 {"skipped_shards": int(self.skipped), "checkpoint_stall_s": round(stall_total, 4)})
        if self.store is not None:
            t0 = time.time()
            self.store.wait()
            if self.rank == 0:
                print(f"last checkpoint upload finished {time.time() - t0:.1f}s after training", flush=True)
        if self.step >= cfg.train.max_steps:
            self.export()
        distributed.barrier()
        print(f"rank {self.rank} finished {self.step} steps", flush=True)

    def checkpoint(self) -> float:
        """Save (upload continues in the background) and draw the pictures; returns the seconds training stalled."""
        t0 = time.time()
        self.store.save(self.engine, self.step, self._client_state(), self.cfg.deepspeed.zero_stage)
        self.save_pictures()
        return time.time() - t0

    @torch.no_grad()
    def save_pictures(self) -> None:
        """Reconstructions of the fixed batch (every rank runs the forward: ZeRO-3 gathers collectively)."""
        if self._picture_batch is None:
            return
        self.engine.eval()
        s1, s2, _ = self.augment(self._picture_batch, self.device)
        g = torch.Generator(device=self.device)
        g.manual_seed(self.cfg.train.seed)
        out = self.engine(s1.to(self.dtype), s2.to(self.dtype), generator=g)
        self.engine.train()
        if self.rank == 0:
            path = os.path.join(self.cfg.run.dir, f"reconstruction-step-{self.step:08d}.png")
            save_reconstructions(path, s1, s2, out, self.cfg.model.patch_size, self.cfg.model.norm_pix_loss,
                                 self.manifest.modalities["s2"]["bands"],
                                 title=f"step {self.step}: loss {out.loss.float().item():.4f}")

    def export(self) -> None:
        """Final encoder weights (gathered from every ZeRO partition) as safetensors + config."""
        import deepspeed

        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if self.rank == 0:
                state = {k: v.detach().float().cpu().clone() for k, v in self.engine.module.encoder_state_dict().items()}
        if self.rank == 0:
            dest = self.cfg.checkpoint.dir or self.cfg.run.dir
            data_info = {
                "manifest": redact_url(self.cfg.data.manifest),
                "image_size": self.cfg.data.image_size,
                "s1_bands": self.manifest.modalities["s1"]["bands"],
                "s2_bands": self.manifest.modalities["s2"]["bands"],
                "stats": {k: self.manifest.stats[k] for k in ("s1", "s2")},
            }
            url = export_encoder(state, self.cfg.model, data_info, dest,
                                 self.cfg.checkpoint.storage_options if self.cfg.checkpoint.dir else None,
                                 extra={"step": self.step})
            print(f"exported encoder to {redact_url(url)}", flush=True)
