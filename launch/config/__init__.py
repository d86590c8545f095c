"""The configuration schemas: one dataclass per concern, YAML files, `key=value` overrides.

- `base`: `ConfigError`, `load_config` / `save_config`, and the sections both jobs use
  (`DataConfig`, `RunConfig`);
- `pretrain`: `PretrainConfig` and the DeepSpeed JSON derived from it;
- `evaluation`: `EvalConfig` (linear probing and fine-tuning).
"""

from launch.config.base import ConfigError, DataConfig, RunConfig, StorageConfig, load_config, save_config
from launch.config.evaluation import EvalConfig, EvalDataConfig, ProtocolConfig, load_eval_config
from launch.config.pretrain import (
    CheckpointConfig,
    DeepSpeedConfig,
    PretrainConfig,
    TrainConfig,
    deepspeed_config,
)

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "DeepSpeedConfig", "EvalConfig", "EvalDataConfig",
    "PretrainConfig", "ProtocolConfig", "RunConfig", "StorageConfig", "TrainConfig", "deepspeed_config", "load_config",
    "load_eval_config", "save_config",
]
