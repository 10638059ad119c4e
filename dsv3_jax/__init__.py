"""dsv3_jax: DeepSeek-V3 in JAX/Flax (MLA with YaRN, DeepSeekMoE, MTP) and its training recipe.
Shape suffixes (`logits_BTV`: batch, tokens, vocabulary): the legend is in README.md, "Reading the code".
"""

from dsv3_jax.io import hf
from dsv3_jax.config import ConfigError, ModelConfig, YarnConfig
from dsv3_jax.model.counting import ParamCount, count_params
from dsv3_jax.model import DeepSeekV3, ModelOutputs, init_variables, logical_axes
from dsv3_jax.config.presets import PRESETS, get_preset

__all__ = [
    "ConfigError", "ModelConfig", "YarnConfig", "ParamCount", "count_params", "DeepSeekV3", "ModelOutputs",
    "init_variables", "logical_axes", "PRESETS", "get_preset", "hf",
]
