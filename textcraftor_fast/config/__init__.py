"""One frozen dataclass tree for a TextCraftor run (sections.py), loaded from TOML and overridden by ``a.b=c``
strings (loading.py):

    cfg = load_config("configs/sd15.toml", overrides=["train.steps=100", "sampler.grad_steps=3"])
"""
from .loading import ALIASES, apply_overrides, config_from_dict, load_config, resolve_config_path, to_toml
from .sections import (DEFAULT_LORA_TARGETS, ConfigError, DataConfig, DistributedConfig, EncoderConfig, LoopConfig,
                       ModelConfig, OpsConfig, OptimConfig, OutputConfig, RewardConfig, SamplerConfig, TrainConfig,
                       UNetConfig)

__all__ = ["ALIASES", "DEFAULT_LORA_TARGETS", "ConfigError", "DataConfig", "DistributedConfig", "EncoderConfig",
           "LoopConfig", "ModelConfig", "OpsConfig", "OptimConfig", "OutputConfig", "RewardConfig", "SamplerConfig",
           "TrainConfig", "UNetConfig", "apply_overrides", "config_from_dict", "load_config", "resolve_config_path",
           "to_toml"]
