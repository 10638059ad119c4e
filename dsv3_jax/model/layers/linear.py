"""A bias-free linear layer whose kernel carries logical axis names for sharding; optionally an FP8 matmul (`model.fp8`,
or a kernel imported as FP8: float8_e4m3fn beside a `kernel_scale`, see dsv3_jax.model.fp8_weights).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dsv3_jax.kernels import KernelSet
from dsv3_jax.model import fp8_weights
from dsv3_jax.model.layers.fp8_linear import fp8_linear


class Linear(nn.Module):
    features: int
    axes: tuple[str, str]
    init_std: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    out_dtype: jnp.dtype | None = None   # accumulate into this dtype (e.g. float32 logits from bf16 inputs)
    fp8: bool = False                    # block-scaled E4M3 operands in the forward and both gradients
    fp8_power_of_two_scales: bool = False
    fp8_impl: str = "reference"          # the pallas_kernels.fp8 kernel (KernelSet.fp8_matmul)
    interpret: bool = False              # run that kernel in its CPU interpreter

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
                            (x.shape[-1], self.features), self.param_dtype)
        if self.has_variable("params", "kernel" + fp8_weights.SCALE_SUFFIX):   # kept FP8 (inference)
            scale = self.get_variable("params", "kernel" + fp8_weights.SCALE_SUFFIX)
            return fp8_weights.matmul(x.astype(self.dtype), kernel, scale, self.out_dtype or self.dtype, self.fp8_impl,
                                      self.interpret)
        if self.fp8:   # quantized straight from the master weights; the weight gradient comes back in their dtype
            return fp8_linear(x.astype(self.dtype), kernel, out_dtype=self.out_dtype or self.dtype,
                              power_of_two=self.fp8_power_of_two_scales, impl=self.fp8_impl,
                              interpret=self.interpret)
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=self.out_dtype)


def make_linear(config, kernels: KernelSet, features: int, axes: tuple[str, str], name: str | None = None,
                out_dtype=None, allow_fp8: bool = True) -> Linear:
    """A projection of `config`'s dtypes running `kernels`' FP8 matmul; FP8 when `config.fp8`, unless
    `allow_fp8=False` (the output head, which DeepSeek-V3 keeps in high precision)."""
    return Linear(features, axes, config.initializer_range, config.jnp_dtype, config.jnp_param_dtype, out_dtype,
                  config.fp8 and allow_fp8, config.fp8_power_of_two_scales, kernels.fp8_matmul, kernels.interpret,
                  name=name)
