"""The generate path (prefill and one absorbed decode step) compiled ahead of time for one device, compile-only chips
included (sharding.targets), on abstract arguments only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.cache import init_cache
from dsv3_jax.infer.decode import decode_step, prefill, serving_config, serving_kernels
from dsv3_jax.model import init_variables
from dsv3_jax.train.build import Compiled, compile_timed, compiler_options, placed


def compile_generate(config: ModelConfig, device, *, batch: int = 4, prompt_len: int = 64,
                     cache_len: int = 128) -> tuple[Compiled, Compiled]:
    """The prefill (batch × prompt_len prompts into a cache_len cache) and one absorbed decode step for `device`,
    with the kernels and XLA options a step there gets."""
    kernels = serving_kernels(config, device)
    options = compiler_options(kernels)
    config = serving_config(config)
    here = SingleDeviceSharding(device)
    on_device = lambda tree: placed(tree, jax.tree.map(lambda _: here, tree))
    variables = on_device(jax.eval_shape(lambda: init_variables(config, jax.random.PRNGKey(0))))
    cache = on_device(jax.eval_shape(lambda: init_cache(config, batch, cache_len)))
    rows = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=here)
    prefilled = compile_timed(lambda: prefill.lower(config, variables, rows(batch, prompt_len), rows(batch), cache,
                                                    kernels=kernels), options)
    decoded = compile_timed(lambda: decode_step.lower(config, variables, rows(batch), rows(batch), cache,
                                                      kernels=kernels), options)
    return prefilled, decoded
