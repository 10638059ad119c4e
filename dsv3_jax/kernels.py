"""The one place that picks every kernel the model runs: FP8 matmul, grouped matmul, dispatch/combine, the
expert-parallel exchange and the attention core, from two explicit config fields.

    model.kernels        auto       what a real chip of the target runs (below)
                         reference  the jnp / XLA references everywhere (any platform)
                         pallas     the target's Pallas kernels, an error where it has none
    model.kernel_target  ""         the default device's platform (what a plain `jax.jit` runs on)
                         cpu | gpu | hopper | tpu, optionally with ":interpret" (that platform's Pallas kernels in
                         their CPU interpreters: how the tests run them here)

`for_devices(config, devices)` fills an empty `kernel_target` from the devices a computation is placed on (a mesh's),
so that a step compiled for compile-only H100s or TPUs (sharding.targets) picks exactly what the chips would:

    target   FP8 matmul  grouped matmul              dispatch/combine   EP exchange       attention (auto)
    tpu      Pallas TPU  Pallas TPU                  Pallas TPU         Pallas all-to-all  attention_core.auto_impl
    hopper   Mosaic GPU  Mosaic GPU (bf16/fp16 compute; reference otherwise)
                                                     Pallas GPU         lax all_to_all     attention_core.auto_impl
    gpu/cpu  reference   reference                   reference          lax all_to_all     xla
"""

from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp

KERNEL_MODES = ("auto", "reference", "pallas")
TARGET_PLATFORMS = ("cpu", "gpu", "hopper", "tpu")
INTERPRET_SUFFIX = ":interpret"
_PALLAS_PLATFORMS = ("hopper", "tpu")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the kernels run: a platform of TARGET_PLATFORMS, and whether Pallas kernels run interpreted (CPU)."""
    platform: str
    interpret: bool = False

    @property
    def name(self) -> str:
        return self.platform + (INTERPRET_SUFFIX if self.interpret else "")


def parse_target(text: str) -> Target | None:
    """'tpu:interpret' -> Target('tpu', True); '' -> None. ValueError (one line) for anything else."""
    if not text:
        return None
    platform, interpret = (text[: -len(INTERPRET_SUFFIX)], True) if text.endswith(INTERPRET_SUFFIX) else (text, False)
    if platform not in TARGET_PLATFORMS:
        raise ValueError(f"model.kernel_target must be empty or one of {', '.join(TARGET_PLATFORMS)} (optionally "
                         f"with '{INTERPRET_SUFFIX}'), got {text!r}")
    if interpret and platform not in _PALLAS_PLATFORMS:
        raise ValueError(f"model.kernel_target={text!r}: only {' and '.join(_PALLAS_PLATFORMS)} have Pallas kernels "
                         f"to interpret")
    return Target(platform, interpret)


def check(kernels: str, kernel_target: str) -> None:
    """ValueError naming the field when the pair cannot select kernels (run by ModelConfig.validate)."""
    if kernels not in KERNEL_MODES:
        raise ValueError(f"model.kernels must be one of {', '.join(KERNEL_MODES)}, got {kernels!r}")
    target = parse_target(kernel_target)
    if kernels == "pallas" and target is not None and target.platform not in _PALLAS_PLATFORMS:
        raise ValueError(f"model.kernels='pallas': target {target.name!r} has no Pallas kernels; use a TPU or a "
                         f"Hopper GPU, or model.kernel_target=tpu{INTERPRET_SUFFIX} / hopper{INTERPRET_SUFFIX} to "
                         f"run them in the CPU interpreters")


def platform_of(device) -> str:
    """'tpu', 'hopper' (an NVIDIA GPU of compute capability 9.x: H100 / H200 / H800), 'gpu' or 'cpu' for a JAX device,
    compile-only devices included."""
    if device.platform == "tpu":
        return "tpu"
    if device.platform in ("gpu", "cuda", "rocm"):
        return "hopper" if str(getattr(device, "compute_capability", "")).startswith("9") else "gpu"
    return "cpu"


def _first_device(devices):
    if hasattr(devices, "devices"):            # a Mesh
        return devices.devices.flat[0]
    if hasattr(devices, "platform"):           # one device
        return devices
    return list(devices)[0]


def target_of(devices) -> Target:
    """The target of a mesh, a device or a sequence of devices (all of one kind)."""
    return Target(platform_of(_first_device(devices)))


def for_devices(config, devices):
    """`config` with an empty `kernel_target` set from `devices` (a Mesh, a device, or a sequence of devices); a
    target the config already names is kept (e.g. 'tpu:interpret' in tests)."""
    if config.kernel_target:
        return config
    return config.replace(kernel_target=target_of(devices).name)


@dataclasses.dataclass(frozen=True)
class KernelSet:
    """Implementation names per op, as the pallas_kernels entry points take them."""
    fp8_matmul: str = "reference"        # pallas_kernels.fp8: reference | tpu | gpu
    grouped_matmul: str = "reference"    # pallas_kernels.grouped_matmul: reference | tpu | gpu
    dispatch: str = "reference"          # pallas_kernels.dispatch: reference | tpu | gpu
    exchange: str = "lax"                # expert-parallel all-to-all: lax | pallas (Pallas TPU remote DMA)
    attention: str = "xla"               # dsv3_jax.model.layers.attention_core impl
    interpret: bool = False              # run the Pallas kernels in their CPU interpreters

    def moe(self):
        """The MoE layer's bundle of routed-expert ops (dsv3_jax.model.moe.backend.MoEKernels)."""
        from dsv3_jax.model.moe.backend import MoEKernels
        exchange = None
        if self.exchange == "pallas":
            from pallas_kernels.all_to_all import all_to_all
            exchange = all_to_all
        return MoEKernels(self.dispatch, self.grouped_matmul, self.interpret, exchange)


def _low_precision(dtype: str) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def select(config) -> KernelSet:
    """The kernels `config` runs (see the module docstring). Pure in the config, except that an empty
    kernel_target reads the default device."""
    return _select(config.kernels, config.kernel_target, config.attention_impl, config.dtype, config.qk_head_dim,
                   config.v_head_dim)


@functools.lru_cache(maxsize=256)
def _select(kernels: str, kernel_target: str, attention_impl: str, dtype: str, qk_head_dim: int,
            v_head_dim: int) -> KernelSet:
    check(kernels, kernel_target)
    target = parse_target(kernel_target) or target_of(jax.devices())
    attention = _attention(attention_impl, target, dtype, qk_head_dim, v_head_dim)
    if kernels == "reference" or target.platform not in _PALLAS_PLATFORMS:
        return KernelSet(attention=attention)
    if target.platform == "tpu":
        # The Pallas all-to-all is a TPU remote-DMA kernel; interpreted, the exchange stays lax's.
        return KernelSet("tpu", "tpu", "tpu", "lax" if target.interpret else "pallas", attention, target.interpret)
    # Hopper: the Mosaic GPU grouped matmul takes bf16/fp16 operands; float32 compute keeps the reference there.
    grouped = "gpu" if _low_precision(dtype) else "reference"
    return KernelSet("gpu", grouped, "gpu" if _low_precision(dtype) else "reference", "lax", attention,
                     target.interpret)


def _attention(impl: str, target: Target, dtype: str, qk_head_dim: int, v_head_dim: int) -> str:
    if impl != "auto":
        return impl
    if target.interpret:   # fused attention libraries have no CPU interpreter: the interpreted targets use xla
        return "xla"
    from dsv3_jax.model.layers import attention_core
    platform = "gpu" if target.platform in ("gpu", "hopper") else target.platform
    return attention_core.auto_impl(platform, target.platform == "hopper", dtype, qk_head_dim, v_head_dim)

