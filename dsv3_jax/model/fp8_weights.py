"""FP8 weights kept as DeepSeek's FP8 checkpoints store them: float8_e4m3fn with one float32 scale per 128×128 block.
`experiments.convert --fp8` keeps them so (1 byte a weight instead of 2 or 4) instead of dequantising: in a params
tree a kept weight `w` (..., C, J) has a sibling `w_scale` (..., ceil(C/128), ceil(J/128)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.fp8 import FP8_DTYPE, fp8_matmul, quantize_1x128
# Aliased so that no `fp8_weights.dequantize` exists: the old (w_q, scale, dtype) form should fail by name.
from pallas_kernels.fp8 import dequantize as dequantize_blocks

BLOCK = 128
SCALE_SUFFIX = "_scale"
SCALES_ITEM = "fp8_scales"   # the orbax item holding the scales of a checkpoint's FP8 params


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The block scales' shape for a weight of `shape` (its last two axes are blocked)."""
    *lead, C, J = shape
    return (*lead, -(-C // BLOCK), -(-J // BLOCK))


def matmul(x_XC, w_q_CJ, scale_CbJb, out_dtype, impl: str = "reference", interpret: bool = False):
    """x · (w_q · scale): x quantised per 1×128 tile, as DeepSeek's inference does, then the block-scaled FP8 matmul
    (float32 accumulation) by the `pallas_kernels.fp8` kernel `impl`. A `Linear` whose params hold `kernel_scale`
    multiplies this way. (The routed experts, whose grouped matmul has no path for kept FP8 weights, are dequantised
    to the compute dtype by the MoE layer, one layer at a time inside the decoder's layer scan, so only one layer's
    worth exists unpacked.)"""
    if w_q_CJ.dtype != FP8_DTYPE:
        raise ValueError(f"an FP8 kernel (one with a kernel_scale) must be {FP8_DTYPE.__name__}, got {w_q_CJ.dtype}")
    lead, C = x_XC.shape[:-1], x_XC.shape[-1]
    x_q, x_scale = quantize_1x128(x_XC.reshape(-1, C))
    y_TJ = fp8_matmul(x_q, x_scale, w_q_CJ, scale_CbJb, impl=impl, out_dtype=out_dtype,
                       interpret=interpret)
    return y_TJ.reshape(*lead, w_q_CJ.shape[1])


def dequantize_siblings(tree: dict, dtype) -> dict:
    """A params dict (one level) with each `w` that has a `w_scale` sibling dequantised to `dtype`, scales dropped
    (MLA's absorbed decoding reads its kv up-projection so)."""
    out = {k: v for k, v in tree.items() if not (k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] in tree)}
    for name in out:
        if name + SCALE_SUFFIX in tree:
            out[name] = dequantize_blocks(tree[name], tree[name + SCALE_SUFFIX], (BLOCK, BLOCK), dtype)
    return out


def with_scales(params: dict, scales: dict) -> dict:
    """`params` with each scale of `scales` (a tree shaped like part of params) added beside its weight."""
    out = dict(params)
    for key, value in scales.items():
        if key not in params:
            raise ValueError(f"fp8 scales for {key!r}, which the params do not have")
        if isinstance(value, dict):
            out[key] = with_scales(params[key], value)
        else:
            out[key + SCALE_SUFFIX] = value
    return out


def dequantize_params(params: dict, scales: dict) -> dict:
    """`params` with each weight that `scales` covers replaced by weight · scale, in the weight's dtype and
    placement (the FP8 values arrive cast exactly into the master dtype by orbax).

    On disk (orbax) the scales are their own item, `fp8_scales` (SCALES_ITEM), shaped like the part of `params` they
    scale, so the `state` item keeps the layout pre-training restores; restoring for training multiplies the scales
    back into the master weights here, which gives the same values as importing without `--fp8`."""
    out = dict(params)
    for key, value in scales.items():
        if isinstance(value, dict):
            out[key] = dequantize_params(params[key], value)
            continue
        w = params[key]
        fn = lambda w_, s_: dequantize_blocks(w_, s_, (BLOCK, BLOCK), w_.dtype)
        sharding = getattr(w, "sharding", None)
        if sharding is not None:
            out[key] = jax.jit(fn, out_shardings=sharding)(w, value)
        else:   # host arrays too come back as jax arrays, like every restored leaf
            out[key] = fn(jnp.asarray(w), jnp.asarray(value))
    return out
