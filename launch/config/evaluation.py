"""The evaluation schema: `EvalConfig` (eval protocol, data, model, run) for linear probing and fine-tuning.

The same pattern as the pretraining schema (OmegaConf structured configs, one dataclass
per concern, `key=value` overrides, cross-field rules in ``__post_init__``,
`ConfigError` naming the file and the dotted key):

    python -m launch.eval --config configs/eval/bigearthnet_linear.yaml \\
        eval.pretrained=s3://bucket/runs/vit_b data.train_manifest=... eval.label_fraction=0.1

``model.*`` describes the network only for ``eval.pretrained=none`` (the random
initialisation baseline); with a pretrained encoder the architecture comes from
the checkpoint, and only the runtime switches ``model.fused_attn`` and
``model.grad_checkpointing`` are taken from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from launch.config.base import DataConfig, RunConfig, Schema, StorageConfig, load_config
from model.config import POOLS, FusMAEConfig

PROTOCOLS = ("linear", "finetune")
OPTIMIZERS = ("sgd", "adamw")
RESUMES = ("none", "auto")
EVAL_POOLS = ("checkpoint", *POOLS)
TASKS = ("multilabel", "singlelabel")
"""The prediction tasks (`launch.evaluation.task`)."""


@dataclass
class EvalDataConfig(DataConfig):
    """The loader settings of pretraining (`launch.config.DataConfig`) with the three labelled splits.

    ``manifest`` is unused here; ``image_size`` is the encoder's input size whatever the pretraining
    used (BigEarthNet's 120 px are resized to it) and must be divisible by its patch size. The crop
    and flip settings apply to fine-tuning on the training split when ``augment`` is on.
    """

    manifest: str = ""
    train_manifest: str = MISSING
    """URL of the labelled training split's manifest.json (BigEarthNet shards from `pipeline.preprocess`)."""
    val_manifest: str = MISSING
    """Validation split: picks the best epoch (macro mAP)."""
    test_manifest: str = MISSING
    """Test split: the reported numbers."""
    image_size: int = 128
    augment: bool = True
    """Fine-tuning: random resized crop + flips on the training split (as pretraining); False: resize only."""

    def __post_init__(self) -> None:
        if self.manifest:
            raise ValueError("data.manifest: evaluation reads data.train_manifest, data.val_manifest and "
                             "data.test_manifest")
        super().__post_init__()


@dataclass
class ProtocolConfig:
    pretrained: str = MISSING
    """A training checkpoint folder (with `latest`), one of its `step-N` folders, an exported
    encoder folder (or an older `encoder.safetensors`), local or any fsspec URL; `none`: random initialisation."""
    protocol: str = "linear"
    """linear: frozen encoder, linear head on cached pooled features; finetune: the whole network."""
    label_fraction: float = 1.0
    """Fraction of the training split used, as a fixed stratified subset chosen by `seed` (0.01, 0.1, 1.0)."""
    seed: int = 0
    """Seeds the subset, the head's initialisation, the sample order and the augmentation."""

    epochs: int = 100
    batch_size: int = 256
    """Training samples per step: of the head (linear) or per process (finetune)."""
    eval_batch_size: int = 256
    """Samples per forward pass of feature extraction and prediction, per process."""
    optimizer: str = "sgd"
    """sgd (momentum) or adamw."""
    lr: float = 0.1
    """Peak learning rate of the head; with `lr_reference_batch` > 0 a base rate, scaled by the global batch."""
    lr_reference_batch: int = 0
    """> 0: the rate used is lr x global batch / lr_reference_batch (the linear scaling rule; MAE uses 256)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay (absolute)."""
    warmup_epochs: float = 0.0
    """Linear warm-up, in epochs (fractions allowed); then cosine decay to min_lr."""
    weight_decay: float = 0.0
    """Not applied to biases, norms and learned tokens."""
    momentum: float = 0.9
    """sgd only."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """adamw only."""
    grad_clip: float = 0.0
    """Clip the global gradient norm (finetune); 0 disables."""
    layer_decay: float = 0.75
    """Finetune: the learning rate of encoder block i (of n) is scaled by layer_decay^(n - i); the
    patch embedding and tokens get layer_decay^(n + 1), the final norm and the head 1 (BEiT / MAE)."""
    encoder_lr_scale: float = 1.0
    """Finetune: an extra factor on every encoder learning rate (0 freezes the encoder's updates)."""
    task: str = "multilabel"
    """multilabel: the json's label_vector, sigmoid + BCE, mAP (BigEarthNet, SEN12MS multi-label); singlelabel:
    its label_index, softmax + cross-entropy, accuracy and macro F1 (SEN12MS single-label)."""
    pool: str = "checkpoint"
    """The pooled feature the head sees: mean (of all patch tokens of both modalities), cls (the class
    token: the MAE / DINO-MM linear-probe convention), or checkpoint (what the pretrained config says)."""
    bf16: bool = True
    """Autocast the encoder to bfloat16 on GPUs (ignored on CPU, which stays float32 and deterministic)."""

    cache_features: bool = True
    """Linear: write the extracted features (and, for fine-tuning, the training labels) to
    `feature_cache_dir/features-<hash>.pt`, keyed by the weights, the split and the input settings."""
    feature_cache_dir: Optional[str] = None
    """Where feature caches live (default: run.dir); share one folder between the runs of a sweep."""

    checkpoint_dir: Optional[str] = None
    """Finetune checkpoints (any fsspec URL); default `<run.dir>/checkpoint`."""
    checkpoint_every: int = 1
    """Finetune: checkpoint every this many epochs (and at stop_at_epoch); 0 disables checkpoints."""
    resume: str = "none"
    """none: start fresh (refused when the checkpoint folder holds a checkpoint); auto: continue from it."""
    stop_at_epoch: Optional[int] = None
    """Finetune: stop after this many epochs (with a checkpoint) without changing the schedule,
    e.g. for a job time limit; the next job continues with resume=auto. No results are written."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for `pretrained` and `checkpoint_dir`; never logged."""

    def __post_init__(self) -> None:
        def check(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"eval.{key}: {msg}")

        check(bool(self.pretrained.strip()), "pretrained", "is empty; give a checkpoint URL or 'none'")
        check(self.protocol in PROTOCOLS, "protocol", f"{self.protocol!r} is not one of {PROTOCOLS}")
        check(0.0 < self.label_fraction <= 1.0, "label_fraction", f"must be in (0, 1], got {self.label_fraction}")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        for key in ("epochs", "batch_size", "eval_batch_size"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.optimizer in OPTIMIZERS, "optimizer", f"{self.optimizer!r} is not one of {OPTIMIZERS}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.lr_reference_batch >= 0, "lr_reference_batch", f"must be >= 0, got {self.lr_reference_batch}")
        check(self.min_lr >= 0, "min_lr", f"must be >= 0, got {self.min_lr}")
        check(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", f"must be in [0, epochs], got {self.warmup_epochs}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(len(self.betas) == 2, "betas", f"need two values, got {self.betas}")
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        check(0.0 < self.layer_decay <= 1.0, "layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        check(self.encoder_lr_scale >= 0, "encoder_lr_scale", f"must be >= 0, got {self.encoder_lr_scale}")
        check(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        check(self.task in TASKS, "task", f"{self.task!r} is not one of {TASKS}")
        check(self.pool in EVAL_POOLS, "pool", f"{self.pool!r} is not one of {EVAL_POOLS}")
        check(self.resume in RESUMES, "resume", f"{self.resume!r} is not one of {RESUMES}")
        check(self.stop_at_epoch is None or self.stop_at_epoch >= 1, "stop_at_epoch",
              f"must be >= 1, got {self.stop_at_epoch}")

    @property
    def random_init(self) -> bool:
        return self.pretrained.strip().lower() == "none"


@dataclass
class EvalConfig(Schema):
    eval: ProtocolConfig = field(default_factory=ProtocolConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    model: FusMAEConfig = field(default_factory=FusMAEConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/eval"))
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        e = self.eval
        if e.protocol == "linear" and e.stop_at_epoch is not None:
            raise ValueError("eval.stop_at_epoch: only fine-tuning is interrupted and resumed")
        if e.random_init and self.data.image_size % self.model.patch_size:
            raise ValueError(f"data.image_size: {self.data.image_size} is not divisible by "
                             f"model.patch_size={self.model.patch_size}")
        if e.random_init:
            self.model.img_size = self.data.image_size

    @property
    def checkpoint_dir(self) -> str:
        return self.eval.checkpoint_dir or f"{self.run.dir.rstrip('/')}/checkpoint"

    @property
    def feature_cache_dir(self) -> str:
        return self.eval.feature_cache_dir or self.run.dir


def load_eval_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> EvalConfig:
    """`launch.config.load_config` with the evaluation schema at the root."""
    return load_config(path, overrides, schema=EvalConfig)
