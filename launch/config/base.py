"""What every schema shares: the error type, loading (YAML + `key=value` overrides), saving, and the
sections used by both pretraining and evaluation (`DataConfig`, `RunConfig`).

Merging, override parsing and type checking are OmegaConf's (structured configs):
an unknown key or a value of the wrong type fails while loading, before any
process group or data loader starts, with the full dotted key in the message.
Cross-field rules live in ``__post_init__`` and run when the merged tree is
turned into the dataclasses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.config import DECODER_PRESETS, ENCODER_PRESETS
from pipeline.storage import CREDENTIALS_IN_URL, redact, redact_url

PRESET_FIELDS = sorted({k for p in (ENCODER_PRESETS, DECODER_PRESETS) for v in p.values() for k in v})


class ConfigError(ValueError):
    """A configuration problem, raised before anything starts."""


class Schema:
    """What a root schema (`PretrainConfig`, `EvalConfig`) can do besides holding its sections."""

    def to_dict(self, redacted: bool = True) -> dict[str, Any]:
        """The resolved settings as plain data; credentials redacted unless asked otherwise."""
        d = asdict(self)  # type: ignore[call-overload]
        return redact(d) if redacted else d


@dataclass
class DataConfig:
    manifest: str = MISSING
    """URL of the training shard set's manifest.json (local path, file://, s3://, ...)."""
    image_size: int = 224
    """Side of the random resized crop fed to the model, in 10 m pixels. Sets model.img_size."""
    num_workers: int = 2
    """Loader worker processes per rank."""
    shuffle_buffer: int = 256
    """Samples in each worker's shuffle block. From local shards (a path, file://, or ``cache_dir`` once a shard is
    cached) the block holds positions only and the arrays are read straight into the batch; from object storage
    it holds the samples' bytes (about 2 MB each at 264 px)."""
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
class StorageConfig:
    retry_window_s: float = 900.0
    """How long a storage call (shard reads, checkpoint uploads, pointers) retries transient errors
    (connection trouble, timeouts, throttling, 5xx) before the run stops with the last error; the
    run's last committed checkpoint stays intact. One setting for the loader and checkpoints."""

    def __post_init__(self) -> None:
        if self.retry_window_s < 0:
            raise ValueError(f"storage.retry_window_s: must be >= 0, got {self.retry_window_s}")


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Local folder for the run's outputs: metrics.jsonl and pictures (pretraining), results.json, feature
    caches and by default checkpoints (evaluation), the resolved config, logs."""


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{key}: {msg}" if key else msg


def _refuse_secret(item: str) -> None:
    """A credential given as a command-line override is refused: launchers print their arguments and every
    process list shows them, so it would leak before this project could redact it."""
    key, _, value = item.partition("=")
    try:
        plain = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException:
        return
    if redact(plain) != plain or "://" in value and redact(value) != value:
        raise ConfigError(f"override {key}=***: credentials are not accepted on the command line (a launcher "
                          "prints its arguments and the process list shows them); give them through the "
                          "environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), a profile "
                          f"(storage_options.profile), or the YAML file ({key.split('.')[0]}.storage_options)")


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, schema: Optional[type] = None):
    """Load ``path`` (YAML) over the defaults of ``schema`` (a dataclass), then ``key=value`` overrides.

    Raises ConfigError naming the file and key for unknown keys, wrong types,
    malformed overrides, missing required values and violated cross-field rules.
    The pretraining schema `PretrainConfig` is the default; evaluation passes `EvalConfig`.
    """
    if schema is None:
        from launch.config.pretrain import PretrainConfig as schema  # noqa: N813
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
        _refuse_secret(item)
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
    for key, value in _strings(asdict(cfg)):
        if "://" in value and redact_url(value) != value and not value.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: {key}={redact_url(value)}: {CREDENTIALS_IN_URL}")
    return cfg


def _strings(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every string in a nested dict."""
    if isinstance(d, dict):
        return [kv for k, v in d.items() for kv in _strings(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), d)] if isinstance(d, str) else []


def save_config(cfg: Any, path: str) -> None:
    """Write a resolved config (any schema with ``to_dict``) as YAML, credentials redacted."""
    import fsspec

    text = OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict(redacted=True)))
    with fsspec.open(path, "w") as f:
        f.write(text)
