"""The pretraining loop: DeepSpeed engine, streaming loader, checkpoints in object storage.

`Trainer.train()` runs `train_step()` until `train.max_steps`; each step is
`grad_accum_steps` micro batches (DeepSpeed steps the optimizer at the
accumulation boundary). Everything a resumed run needs is gathered in one
place, `_client_state()`: the step, the loader position, the run id and the
resolved config (credentials redacted).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import Any, Optional

import torch

from launch import distributed
from launch.config import ConfigError, PretrainConfig, deepspeed_config, save_config
from launch.data.augment import DeviceAugment
from launch.data.fit import check_model_fits, derive_bands
from launch.data.loader import LoaderSettings, PassLoader, ShardLoader
from launch.training import checkpoint
from launch.training.checkpoint import CheckpointWriter, Committed
from launch.training.export import FOLDER as EXPORT_FOLDER
from launch.training.export import export_pretrained, hub_config
from launch.training.keylog import SampleKeyLog
from launch.training.metrics import MetricsLogger
from launch.training.pictures import save_reconstructions
from launch.training.schedule import decay_groups, warmup_cosine
from model import FusMAE
from model.flops import estimate_flops_per_sample
from pipeline.lease import Lease, LeaseHeld
from pipeline.manifest import load_manifest
from pipeline.storage import join, redact_url, set_retry_window

log = logging.getLogger("launch.training.trainer")


class Trainer:
    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        set_retry_window(cfg.storage.retry_window_s)  # this rank, its loader workers and upload threads
        self.rt = distributed.Runtime.start()
        self.rank, self.world_size, self.local_rank = self.rt.rank, self.rt.world_size, self.rt.local_rank
        self.has_gpu = torch.cuda.is_available()
        self.device = self.rt.device
        torch.manual_seed(cfg.train.seed)
        os.makedirs(cfg.run.dir, exist_ok=True)

        self.manifest = self._manifest()
        derive_bands(cfg.model, self.manifest, "model.*")  # the shards' bands, by name, unless model.* says
        check_model_fits(cfg.model, self.manifest, "model.*", image_size=cfg.data.image_size)
        try:
            self.lr = cfg.train.peak_lr(self.world_size)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if self.rank == 0:  # the settings as run: the bands and counts filled in from the manifest
            save_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))
            print(f"input bands: S1 {cfg.model.s1_bands}, S2 {cfg.model.s2_bands}", flush=True)
            print(f"peak {cfg.train.describe_lr(self.world_size)}", flush=True)
        self.model = FusMAE(cfg.model)

        # Where to resume from must be known before the engine exists (universal loading is an engine option).
        self.run_id = self.rt.broadcast(checkpoint.new_run_id() if self.rank == 0 else None)
        self.writer: Optional[CheckpointWriter] = None
        if cfg.checkpoint.dir:
            self.writer = CheckpointWriter(cfg.checkpoint.dir, os.path.join(cfg.run.dir, "staging"), self.rank,
                                           self.world_size, cfg.checkpoint.keep, self.run_id,
                                           cfg.checkpoint.storage_options)
        self.lease: Optional[Lease] = None
        try:
            self.resume_from: Optional[Committed] = self.rt.on_main(self._take_folder_and_resolve,
                                                                    expected=(ConfigError, LeaseHeld))
            self._build()
        except BaseException as err:  # the broadcast of what to resume from (a SIGTERM while it waits for slow
            # ranks), the engine, the checkpoint to load, the loader: a folder taken is given back
            self.release_lease(err)
            raise

    def _build(self) -> None:
        """Everything after the checkpoint folder is held: the engine, the resumed state, the loader, the metrics."""
        cfg = self.cfg
        universal = bool(self.resume_from and self.resume_from.world_size != self.world_size)

        self.engine, self.optimizer, self.scheduler = self._engine(universal)
        self.dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32

        d, t = cfg.data, cfg.train
        self.loader = ShardLoader(self.manifest, LoaderSettings.from_config(d), rank=self.rank,
                                  world_size=self.world_size, micro_batch_size=t.micro_batch_size, seed=t.seed)
        self.augment = DeviceAugment.for_manifest(self.manifest, d.image_size).to(self.device)
        self.step = 0
        if self.resume_from is not None:
            self._load(universal)
        self.samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * self.world_size
        self.metrics = MetricsLogger(
            cfg.run.dir, self.rank, self.world_size, cfg.train.max_steps, self.samples_per_step,
            estimate_flops_per_sample(cfg.model, d.image_size), distributed.device_name(),
            monitor=getattr(self.engine, "monitor", None), resume_step=self.step,
        )
        self.key_log = SampleKeyLog(cfg.run.dir, self.rank, self.step) if cfg.train.log_sample_keys else None
        self._picture_batch = self._fixed_batch()

    # ------------------------------------------------------------------ setup
    def _manifest(self):
        """The training shard set's manifest; a missing, unreadable or refused one is a clear ConfigError."""
        url = self.cfg.data.manifest
        try:
            return load_manifest(url, self.cfg.data.storage_options)
        except (FileNotFoundError, ValueError) as err:  # ManifestError is a ValueError
            raise ConfigError(f"data.manifest: {err}") from err
        except PermissionError as err:
            raise ConfigError(f"data.manifest={redact_url(url)}: access denied ({redact_url(str(err))}); "
                              "check the credentials") from err

    def _engine(self, universal: bool) -> tuple[Any, Any, Any]:
        """The DeepSpeed engine, its optimizer (AdamW, no decay on tokens, norms and biases) and the schedule."""
        import deepspeed

        cfg, t = self.cfg, self.cfg.train
        ds_config = deepspeed_config(cfg, self.world_size, self.has_gpu)
        if universal:
            ds_config["checkpoint"] = {"load_universal": True}
        groups = decay_groups(self.model, t.weight_decay, self.model.no_weight_decay())
        if cfg.deepspeed.uses_torch_adam(self.has_gpu):
            # fused: the one-kernel CUDA step, for parameters on the GPU (offloaded ones live in host memory)
            fused = self.has_gpu and not cfg.deepspeed.offload_optimizer
            optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=tuple(t.betas), fused=fused)
        else:  # DeepSpeed's fused Adam, configured from the same schema
            optimizer = None
            ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": self.lr, "betas": list(t.betas),
                                                                  "weight_decay": t.weight_decay}}
        schedule = warmup_cosine(t.warmup_steps, t.max_steps, t.min_lr / self.lr)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=self.model, model_parameters=groups, optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule), config=ds_config,
        )
        return engine, optimizer, scheduler

    def _take_folder_and_resolve(self) -> Optional[Committed]:
        """Rank 0 only: the lease of checkpoint.dir (one training run per folder), then what to resume from."""
        ckpt = self.cfg.checkpoint
        if ckpt.dir:
            self.lease = Lease(ckpt.dir, f"launch/train.py run {self.run_id[:12]}", ckpt.storage_options,
                               force=ckpt.force_lease).acquire()
        try:
            return self._resolve_resume()
        except BaseException as err:  # a resume the folder cannot give: the folder is free for the corrected run
            self.release_lease(err)
            raise

    def release_lease(self, error: Optional[BaseException] = None) -> None:
        """Give checkpoint.dir back (rank 0): at the end of training, or as the run stops on ``error``, which a
        failed release never replaces (`Lease.release_after`); a lease left behind is taken over by the next
        run once this process is gone or its heartbeat is stale."""
        if error is not None and self.writer is not None:
            self.writer.abandon()  # an upload still running must not commit into a folder this run gave back
        if self.lease is not None:
            lease, self.lease = self.lease, None
            lease.release_after(error)

    def _resolve_resume(self) -> Optional[Committed]:
        """Rank 0 only: the checkpoint to load, after cleaning what an interrupted run left behind."""
        cfg = self.cfg
        ckpt_dir, options = cfg.checkpoint.dir, cfg.checkpoint.storage_options
        if cfg.resume == "none":
            if ckpt_dir and checkpoint.find_latest(ckpt_dir, options) is not None:
                raise ConfigError(f"checkpoint.dir {redact_url(ckpt_dir)} already holds committed "
                                  "checkpoints: pass resume=auto to continue, or choose another checkpoint.dir")
            if ckpt_dir:
                checkpoint.discard_uncommitted(ckpt_dir, options, None)
            return None
        if not ckpt_dir and cfg.resume == "auto":
            raise ConfigError("resume=auto needs checkpoint.dir")
        found = checkpoint.resolve(cfg.resume, ckpt_dir, options)
        if ckpt_dir and cfg.resume == "auto":
            checkpoint.discard_uncommitted(ckpt_dir, options, found.tag if found else None)
        if found is None:
            print(f"resume=auto: no committed checkpoint in {redact_url(ckpt_dir)}; starting fresh", flush=True)
        return found

    def _load(self, universal: bool) -> None:
        ckpt = self.resume_from
        # One process per node downloads the checkpoint (ZeRO loading reads every rank's partition files);
        # at another world size it also converts it to DeepSpeed's universal format. The others wait.
        folder = os.path.join(self.cfg.run.dir, "staging", f"resume-{distributed.node_id()}")
        tag = ckpt.tag + "_universal" if universal else ckpt.tag
        if self.local_rank == 0:
            checkpoint.fetch(ckpt, folder, self.cfg.checkpoint.storage_options)
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
        # The schedule's peak comes back with the scheduler's state: a run keeps the rate it started with,
        # also when it continues at another world size (where base_lr's rule alone would give another).
        started = float(client.get("peak_lr", self.lr))
        if self.rank == 0:
            how = f"universal conversion from world size {ckpt.world_size}" if universal else "same world size"
            print(f"resumed from {redact_url(ckpt.url)}/{ckpt.tag} at step {self.step} ({how})", flush=True)
            if abs(started - self.lr) > 1e-12 * max(started, self.lr):
                rule = self.cfg.train.describe_lr(self.world_size)
                print(f"keeping the run's peak lr {started:.4g} from its checkpoint ({rule} at this world size); "
                      "start a new run to change it", flush=True)
        self.lr = started

    def _fixed_batch(self) -> Optional[dict[str, Any]]:
        """A few samples, the same on every rank and every run, for the reconstruction pictures."""
        if not self.cfg.checkpoint.dir:  # pictures are drawn at checkpoints only
            return None
        n = min(16, self.manifest.num_samples)
        settings = LoaderSettings(num_workers=0, storage_options=dict(self.cfg.data.storage_options))
        batch = next(iter(PassLoader(self.manifest, settings, batch_size=n, with_meta=False)))
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
            "peak_lr": self.lr,  # base_lr x global batch / 256, or train.lr
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
        keys: list[str] = []
        for micro in range(self.cfg.train.grad_accum_steps):
            batch = next(batches)
            keys.extend(batch["keys"])
            s1, s2, nonfinite = self.augment(batch, self.device)
            out = self.engine(s1.to(self.dtype), s2.to(self.dtype), generator=self._generator(micro))
            self.engine.backward(out.loss)
            self.engine.step()
            self.metrics.accumulate(out.loss, out.loss_s1, out.loss_s2, nonfinite)
        self.step += 1
        if self.key_log is not None:
            self.key_log.write(self.step, keys)

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
            if self.writer is not None and (self.step % cfg.checkpoint.every_steps == 0 or self.step == stop):
                stall_total += self.checkpoint()
            if self.step % cfg.train.log_every == 0 or self.step == stop:
                skipped = self.loader.skipped  # this rank's; the logged values are summed over every rank
                self.metrics.log(self.step, self.scheduler.get_last_lr()[0],
                                 {"checkpoint_stall_s": round(stall_total, 4)},
                                 summed={"skipped_shards": skipped["shards"], "skipped_samples": skipped["samples"]})
        if self.key_log is not None:
            self.key_log.close()
        if self.writer is not None:
            t0 = time.time()
            self.writer.wait()
            if self.rank == 0:
                print(f"last checkpoint upload finished {time.time() - t0:.1f}s after training", flush=True)
        if self.step >= cfg.train.max_steps:
            self.export()
        distributed.barrier()
        self.release_lease()
        print(f"rank {self.rank} finished {self.step} steps", flush=True)

    def checkpoint(self) -> float:
        """Save (upload continues in the background) and draw the pictures; returns the seconds training stalled."""
        t0 = time.time()
        self.writer.save(self.engine, self.step, self._client_state(), self.cfg.deepspeed.zero_stage)
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
        """Final encoder weights (gathered from every ZeRO partition) as a Hub-format folder,
        ``<checkpoint.dir or run.dir>/encoder/`` (`launch.training.export.export_pretrained`)."""
        import deepspeed

        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if self.rank == 0:
                state = {k: v.detach().float().cpu().clone() for k, v in self.engine.module.encoder_state_dict().items()}
        if self.rank == 0:
            ckpt_dir = self.cfg.checkpoint.dir
            dest = join(ckpt_dir or self.cfg.run.dir, EXPORT_FOLDER)
            config = hub_config(self.cfg.model, self.manifest, self.cfg.data.image_size, self.step,
                                checkpoint=ckpt_dir, tag=checkpoint.tag_for(self.step) if ckpt_dir else None,
                                zero_stage=self.cfg.deepspeed.zero_stage)
            url = export_pretrained(state, config, dest, self.cfg.checkpoint.storage_options if ckpt_dir else None)
            print(f"exported encoder to {redact_url(url)}", flush=True)
