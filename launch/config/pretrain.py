"""The pretraining schema: `PretrainConfig` (model, data, train, checkpoint, deepspeed, run, resume).

The DeepSpeed JSON is generated from it (`deepspeed_config`), so the batch size,
learning rate and precision are set in exactly one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from launch.config.base import DataConfig, RunConfig, Schema, StorageConfig
from model.config import FusMAEConfig

DEFAULT_BASE_LR = 1.5e-4
"""MAE's base learning rate (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", Table 8)."""
LR_REFERENCE_BATCH = 256
"""The batch size base_lr refers to: lr = base_lr x global batch / 256 (the same paper)."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps in the run (each of micro_batch_size × grad_accum_steps × world size samples)."""
    micro_batch_size: int = 32
    """Samples per rank per forward pass."""
    grad_accum_steps: int = 1
    base_lr: Optional[float] = None
    """MAE's rule: the peak learning rate is base_lr x global batch / 256, the global batch being
    micro_batch_size x grad_accum_steps x world size (He et al. 2022, Table 8 / appendix A.1: base lr
    1.5e-4). With neither base_lr nor lr set, base_lr is 1.5e-4."""
    lr: Optional[float] = None
    """The peak learning rate as an absolute value, not scaled by the batch: the alternative to base_lr
    (setting both is an error; on top of a recipe that gives base_lr, override with train.base_lr=null)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay (absolute)."""
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    bf16: bool = True
    stop_at_step: Optional[int] = None
    """Stop (with a checkpoint) at this step without changing the schedule, e.g. to fit a cluster's job
    time limit; the next job continues with resume=auto."""
    seed: int = 0
    log_every: int = 10
    """Read losses back from the device and log every this many steps (no sync in between)."""
    log_sample_keys: bool = False
    """Write each step's sample keys, per rank, to <run.dir>/sample_keys/rank-NNNNN.jsonl (launch.training.keylog):
    an audit of the data order, and what an exact resume is checked against."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.lr is not None and self.base_lr is not None:
            raise ValueError(f"train.lr={self.lr} and train.base_lr={self.base_lr}: give one (base_lr is scaled by "
                             "the global batch, lr is absolute); to use lr over a recipe's base_lr add "
                             "train.base_lr=null")
        if self.lr is None and self.base_lr is None:
            self.base_lr = DEFAULT_BASE_LR
        rate, key = (self.lr, "lr") if self.lr is not None else (self.base_lr, "base_lr")
        if rate <= 0 or self.min_lr < 0:
            raise ValueError(f"train.{key} / train.min_lr: need {key} > 0 and min_lr >= 0, got {rate}, {self.min_lr}")
        if len(self.betas) != 2:
            raise ValueError(f"train.betas: need two values, got {self.betas}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("train.warmup_steps / grad_clip / weight_decay: must be >= 0")


    def global_batch(self, world_size: int) -> int:
        """Samples per optimizer step."""
        return self.micro_batch_size * self.grad_accum_steps * world_size

    def peak_lr(self, world_size: int) -> float:
        """The learning rate after warm-up: ``lr``, or ``base_lr x global batch / 256``."""
        lr = self.lr if self.lr is not None else self.base_lr * self.global_batch(world_size) / LR_REFERENCE_BATCH
        if self.min_lr > lr:
            raise ValueError(f"train.min_lr={self.min_lr} is above the peak learning rate {lr:.3g} "
                             f"({self.describe_lr(world_size)})")
        return lr

    def describe_lr(self, world_size: int) -> str:
        """How the peak learning rate comes about, for the log."""
        if self.lr is not None:
            return f"lr {self.lr:.4g} (absolute: train.lr)"
        n = self.global_batch(world_size)
        return (f"lr {self.base_lr * n / LR_REFERENCE_BATCH:.4g} = base_lr {self.base_lr:.4g} x global batch {n} "
                f"({self.micro_batch_size} x {self.grad_accum_steps} accumulation x {world_size} ranks) "
                f"/ {LR_REFERENCE_BATCH}")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """fsspec URL of the checkpoint folder (s3://bucket/run, local path); None disables checkpoints."""
    every_steps: int = 500
    keep: int = 3
    """Committed checkpoints kept; older ones are deleted only after a newer one is committed."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    force_lease: bool = False
    """Take over checkpoint.dir from another run whose lease is still fresh (it is known to be gone). A run
    holds the folder's lease while it trains: a second run on the same folder is refused."""

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps: must be >= 1, got {self.every_steps}")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep: must be >= 1, got {self.keep}")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    offload_optimizer: bool = False
    """ZeRO-Offload of optimizer states to host memory (stages 1-3); the step runs there, in DeepSpeed's CPU Adam
    (or in torch's AdamW when `torch_adam` is true, as it is without a GPU)."""
    torch_adam: Optional[bool] = None
    """Use torch's AdamW instead of DeepSpeed's fused op; None = automatic (True without a GPU)."""
    monitor: str = "none"
    """DeepSpeed's own monitor: none, csv or tensorboard (written under run.dir)."""
    bucket_size: float = 5e7
    """Elements per ZeRO reduce / all-gather (and stage-3 prefetch) bucket."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.monitor not in ("none", "csv", "tensorboard"):
            raise ValueError(f"deepspeed.monitor: must be none, csv or tensorboard, got {self.monitor!r}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer: ZeRO-Offload partitions the optimizer states, which "
                             "stage 0 does not: set deepspeed.zero_stage to 1, 2 or 3")

    def uses_torch_adam(self, has_gpu: bool) -> bool:
        """Whether the optimizer is torch's AdamW (`torch_adam`, automatic: without a GPU) or DeepSpeed's."""
        return self.torch_adam if self.torch_adam is not None else not has_gpu


@dataclass
class PretrainConfig(Schema):
    model: FusMAEConfig = field(default_factory=FusMAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    resume: str = "none"
    """none: start fresh; auto: newest committed checkpoint in checkpoint.dir, else fresh; or a checkpoint URL."""

    def __post_init__(self) -> None:
        # data.image_size is the single source of the input size; the model follows it.
        if self.data.image_size % self.model.patch_size:
            raise ValueError(f"data.image_size: {self.data.image_size} is not divisible by "
                             f"model.patch_size={self.model.patch_size}")
        self.model.img_size = self.data.image_size
        if self.resume == "auto" and not self.checkpoint.dir:
            raise ValueError("resume: 'auto' needs checkpoint.dir")
        if self.resume not in ("none", "auto") and "/" not in self.resume:
            raise ValueError(f"resume: {self.resume!r} is neither none, auto nor a checkpoint URL "
                             "(a checkpoint folder or one of its step-N folders)")


def deepspeed_config(cfg: PretrainConfig, world_size: int, has_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config derived from ``cfg`` (one source of truth).

    The optimizer and scheduler are built by the trainer (AdamW with warm-up and
    cosine decay), so only engine settings go here.
    """
    t, ds = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        # DeepSpeed's default buckets hold 5e8 elements (1 GB in bf16, twice that with overlap_comm):
        # several times the model states of a ViT-B. 5e7 keeps communication efficient at a tenth.
        zero.update(overlap_comm=has_gpu, contiguous_gradients=True, reduce_bucket_size=int(ds.bucket_size),
                    allgather_bucket_size=int(ds.bucket_size))
        if ds.zero_stage == 3:
            zero.update(stage3_prefetch_bucket_size=int(ds.bucket_size))
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": has_gpu}
    if ds.zero_stage == 3:
        # Gather the full weights into the checkpoint on save so that exports and
        # evaluation do not need the ZeRO partition files.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": t.bf16},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # the trainer logs; keep DeepSpeed's own prints quiet
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer and ds.uses_torch_adam(has_gpu):
        # DeepSpeed refuses a client optimizer with ZeRO-Offload unless told: torch's AdamW then steps the
        # host-memory fp32 partitions (DeepSpeed's CPU Adam is faster there; torch_adam=false selects it).
        conf["zero_force_ds_cpu_optimizer"] = False
    if ds.monitor == "tensorboard":
        conf["tensorboard"] = {"enabled": True, "output_path": cfg.run.dir, "job_name": "deepspeed"}
    elif ds.monitor == "csv":
        conf["csv_monitor"] = {"enabled": True, "output_path": cfg.run.dir, "job_name": "deepspeed"}
    return json.loads(json.dumps(conf))
