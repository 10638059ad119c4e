"""SwiGLU MLP: down(silu(gate x) * up x). Used for the dense layers and the shared experts."""

from __future__ import annotations

import flax.linen as nn
import jax

from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels import KernelSet
from dsv3_jax.model.layers.linear import make_linear


class MLP(nn.Module):
    config: ModelConfig
    kernels: KernelSet
    hidden: int

    @nn.compact
    def __call__(self, x_BTD):
        c, ks = self.config, self.kernels
        gate_BTF = make_linear(c, ks, self.hidden, ("embed", "mlp"), "gate")(x_BTD)
        up_BTF = make_linear(c, ks, self.hidden, ("embed", "mlp"), "up")(x_BTD)
        h_BTF = nn.with_logical_constraint(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "length", "mlp"))
        return make_linear(c, ks, x_BTD.shape[-1], ("mlp", "embed"), "down")(h_BTF)
