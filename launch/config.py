"""The one configuration schema: a dataclass per concern, YAML files, `key=value` overrides.

Merging, override parsing and type checking are OmegaConf's (structured configs):
an unknown key or a value of the wrong type fails while loading, before any
process group or data loader starts, with the full dotted key in the message.
Cross-field rules live in ``__post_init__`` and run when the merged tree is
turned into these dataclasses.

The DeepSpeed JSON is generated from this schema (`deepspeed_config`), so the
batch size, learning rate and precision are set in exactly one place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.config import DECODER_PRESETS, ENCODER_PRESETS, FusMAEConfig
from pipeline.storage import redact


PRESET_FIELDS = sorted({k for p in (ENCODER_PRESETS, DECODER_PRESETS) for v in p.values() for k in v})


class ConfigError(ValueError):
    """A configuration problem, raised before anything starts."""


@dataclass
class DataConfig:
    manifest: str = MISSING
    """URL of the training shard set's manifest.json (local path, file://, s3://, ...)."""
    image_size: int = 224
    """Side of the random resized crop fed to the model, in 10 m pixels. Sets model.img_size."""
    num_workers: int = 2
    """Loader worker processes per rank."""
    shuffle_buffer: int = 256
    """Samples held in each worker's shuffle buffer (memory: about 2 MB each at 264 px)."""
    crop_scale_min: float = 0.35
    """Smallest area fraction of the random resized crop (upper bound 1.0)."""
    hflip: bool = True
    vflip: bool = True
    cache_dir: Optional[str] = None
    """Local folder for a shard cache: epochs after the first read shards from disk."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Extra fsspec options for the shard store; credentials here are never logged."""

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"data.image_size: must be positive, got {self.image_size}")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"data.crop_scale_min: must be in (0, 1], got {self.crop_scale_min}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers: must be >= 0, got {self.num_workers}")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps in the run (each of micro_batch_size × grad_accum_steps × world size samples)."""
    micro_batch_size: int = 32
    """Samples per rank per forward pass."""
    grad_accum_steps: int = 1
    lr: float = 1.5e-4
    """Peak learning rate after warm-up (absolute, not scaled by batch size)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
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

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"train.lr / train.min_lr: need 0 <= min_lr <= lr and lr > 0, got {self.lr}, {self.min_lr}")
        if len(self.betas) != 2:
            raise ValueError(f"train.betas: need two values, got {self.betas}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("train.warmup_steps / grad_clip / weight_decay: must be >= 0")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """fsspec URL of the checkpoint folder (s3://bucket/run, local path); None disables checkpoints."""
    every_steps: int = 500
    keep: int = 3
    """Committed checkpoints kept; older ones are deleted only after a newer one is committed."""
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps: must be >= 1, got {self.every_steps}")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep: must be >= 1, got {self.keep}")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    offload_optimizer: bool = False
    """ZeRO-Offload of optimizer states to host memory (stages 1-3)."""
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


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Local folder for metrics.jsonl, reconstruction pictures and logs."""


@dataclass
class Config:
    model: FusMAEConfig = field(default_factory=FusMAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)
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

    def to_dict(self, redacted: bool = True) -> dict[str, Any]:
        d = asdict(self)
        return redact(d) if redacted else d


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{key}: {msg}" if key else msg


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, schema: type = Config):
    """Load ``path`` (YAML) over the defaults of ``schema`` (a dataclass), then ``key=value`` overrides.

    Raises ConfigError naming the file and key for unknown keys, wrong types,
    malformed overrides, missing required values and violated cross-field rules.
    The pretraining schema `Config` is the default; evaluation passes its own.
    """
    overrides = list(overrides or [])
    base = OmegaConf.structured(schema)
    if "model" in base:
        # The default model instance already filled its architecture fields from the
        # default preset; clear them so that `model.size` in a file or override decides.
        for key in PRESET_FIELDS:
            base.model[key] = None
    layers = [base]
    where = path or "<defaults>"
    if path is not None:
        try:
            layers.append(OmegaConf.load(path))
        except FileNotFoundError as err:
            raise ConfigError(f"config file not found: {path}") from err
        except Exception as err:  # YAML syntax errors come from several yaml classes
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.max_steps=20")
    try:
        layers.append(OmegaConf.from_dotlist(overrides))
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {_describe(err)}") from err
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{where}: required setting(s) not given: {', '.join(missing)}")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {_describe(err)}") from err
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from err
    assert isinstance(cfg, schema)
    return cfg


def save_config(cfg: Any, path: str) -> None:
    """Write a resolved config (any schema with ``to_dict``) as YAML, credentials redacted."""
    import fsspec

    text = OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict(redacted=True)))
    with fsspec.open(path, "w") as f:
        f.write(text)


def deepspeed_config(cfg: Config, world_size: int, has_gpu: bool) -> dict[str, Any]:
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
    if ds.offload_optimizer and ds.zero_stage > 0:
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
    if ds.monitor == "tensorboard":
        conf["tensorboard"] = {"enabled": True, "output_path": cfg.run.dir, "job_name": "deepspeed"}
    elif ds.monitor == "csv":
        conf["csv_monitor"] = {"enabled": True, "output_path": cfg.run.dir, "job_name": "deepspeed"}
    return json.loads(json.dumps(conf))
