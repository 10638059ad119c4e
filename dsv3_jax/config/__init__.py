"""Configuration: the model's shapes and switches (ModelConfig), named model presets, `--set` overrides and the
one error every check raises."""

from dsv3_jax.config.errors import ConfigError
from dsv3_jax.config.model_config import ModelConfig, YarnConfig, yarn_mscale
from dsv3_jax.config.presets import PRESETS, get_preset

__all__ = ["ConfigError", "ModelConfig", "YarnConfig", "yarn_mscale", "PRESETS", "get_preset"]
