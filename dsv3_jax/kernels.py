"""Which kernels a model runs: resolved once, before tracing, from the config and the devices a step is placed on,
into one frozen KernelSet that every layer receives as configuration (layers never choose)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from dsv3_jax.config.errors import ConfigError
from sharding.targets import PLATFORMS as TARGET_PLATFORMS
from sharding.targets import platform_of

KERNEL_MODES = ("auto", "reference", "pallas")
INTERPRET_SUFFIX = ":interpret"
PALLAS_PLATFORMS = ("hopper", "tpu")
ATTENTION_IMPLS = ("xla", "blockwise", "splash", "cudnn", "cudnn_mla")   # what `auto` resolves among


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the kernels run: a platform of TARGET_PLATFORMS, and whether Pallas kernels run interpreted (CPU)."""
    platform: str
    interpret: bool = False

    @property
    def name(self) -> str:
        return self.platform + (INTERPRET_SUFFIX if self.interpret else "")


def parse_target(text: str) -> Target | None:
    """'tpu:interpret' -> Target('tpu', True); '' -> None. ConfigError (one line) for anything else."""
    if not text:
        return None
    platform, interpret = (text[: -len(INTERPRET_SUFFIX)], True) if text.endswith(INTERPRET_SUFFIX) else (text, False)
    if platform not in TARGET_PLATFORMS:
        raise ConfigError(f"model.kernel_target must be empty or one of {', '.join(TARGET_PLATFORMS)} (optionally "
                          f"with '{INTERPRET_SUFFIX}'), got {text!r}")
    if interpret and platform not in PALLAS_PLATFORMS:
        raise ConfigError(f"model.kernel_target={text!r}: only {' and '.join(PALLAS_PLATFORMS)} have Pallas kernels "
                          f"to interpret")
    return Target(platform, interpret)


def check(kernels: str, kernel_target: str) -> None:
    """ConfigError naming the field when the pair cannot select kernels (run by ModelConfig.validate)."""
    if kernels not in KERNEL_MODES:
        raise ConfigError(f"model.kernels must be one of {', '.join(KERNEL_MODES)}, got {kernels!r}")
    target = parse_target(kernel_target)
    if kernels == "pallas" and target is not None:
        _check_pallas_target(target)


def _check_pallas_target(target: Target) -> None:
    if target.platform not in PALLAS_PLATFORMS:
        raise ConfigError(f"model.kernels='pallas': target {target.name!r} has no Pallas kernels; use a TPU or a "
                          f"Hopper GPU, or model.kernel_target=tpu{INTERPRET_SUFFIX} / hopper{INTERPRET_SUFFIX} to "
                          f"run them in the CPU interpreters")


def first_device(devices):
    """The first device of a Mesh, a device, or a sequence of devices."""
    if hasattr(devices, "devices"):            # a Mesh
        return devices.devices.flat[0]
    if hasattr(devices, "platform"):           # one device
        return devices
    return list(devices)[0]


def target_of(devices) -> Target:
    """The target of a mesh, a device or a sequence of devices (all of one kind)."""
    return Target(platform_of(first_device(devices)))


@dataclasses.dataclass(frozen=True)
class ExpertSplit:
    """The routed experts split over mesh axis `axis` (expert parallelism): with a `mesh`, the MoE layer opens its own
    shard_map over it; without, it already runs inside a shard_map where `axis` is manual and holds E/EP experts."""
    axis: str = "expert"
    mesh: Any = None
    capacity_factor: float = 1.25
    node_size: int = 0                   # ranks of `axis` sharing a node (sharding.mesh.expert_node_size); 0: one


@dataclasses.dataclass(frozen=True)
class KernelSet:
    """Implementation names per op, as the pallas_kernels entry points take them, and where the routed experts run."""
    target: str = "cpu"                  # the kernel target they were resolved for (Target.name)
    fp8_matmul: str = "reference"        # pallas_kernels.fp8: reference | tpu | gpu
    grouped_matmul: str = "reference"    # pallas_kernels.grouped_matmul: reference | tpu | gpu
    dispatch: str = "reference"          # pallas_kernels.dispatch: reference | tpu | gpu
    exchange: str = "lax"                # expert-parallel all-to-all: lax | tpu (Pallas remote DMA, whole axis) |
                                         # gpu (Mosaic GPU NVLink writes, inside nodes; XLA's across them)
    attention: str = "xla"               # the MLA attention core (dsv3_jax.model.layers.attention_core)
    interpret: bool = False              # run the Pallas kernels in their CPU interpreters
    experts: ExpertSplit | None = None   # expert parallelism; None: every expert local
    expert_node_size: int = 0            # ranks of the expert axis per node, for ExpertSplit (0: one node)

    def split_experts(self, split: ExpertSplit | None) -> "KernelSet":
        return dataclasses.replace(self, experts=split)

    def describe(self) -> dict:
        """The choices as plain values (a run's config dump)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "experts"}
        split = self.experts
        out["experts"] = None if split is None else {
            "axis": split.axis, "capacity_factor": split.capacity_factor, "node_size": split.node_size,
            "mesh": None if split.mesh is None else dict(split.mesh.shape)}
        return out


REFERENCE = KernelSet()   # the jnp / XLA references: any platform, exact


def resolve(config, devices) -> KernelSet:
    """The kernels `config` (a ModelConfig) runs on `devices` (a Mesh, a device or a sequence of them): model.kernels
    auto picks what a real chip of the target runs, reference the references, pallas the target's Pallas kernels (a
    ConfigError naming the op and target where one does not exist). model.kernel_target, when set, overrides the
    devices' platform. Every expert local; the step builder adds expert parallelism (KernelSet.split_experts).

        target   FP8 matmul  grouped matmul / dispatch          EP exchange          attention (auto)
        tpu      Pallas TPU  Pallas TPU                         Pallas all-to-all    splash
        hopper   Mosaic GPU  Mosaic GPU / Pallas GPU (bf16/fp16 Mosaic GPU in nodes,  cudnn or blockwise
                             compute; float32: the references)  lax across them
        gpu/cpu  reference   reference                          lax all_to_all       blockwise (gpu) / xla (cpu)

    model.exchange_impl=lax keeps XLA's all-to-all on TPUs and Hopper too; interpreted targets use it always.
    """
    check(config.kernels, config.kernel_target)
    target = parse_target(config.kernel_target) or target_of(devices)
    return _resolve(config.kernels, target, config.attention_impl, config.exchange_impl, config.dtype,
                    config.qk_head_dim, config.v_head_dim)


@functools.lru_cache(maxsize=256)
def _resolve(mode: str, target: Target, attention_impl: str, exchange_impl: str, dtype: str, qk_head_dim: int,
             v_head_dim: int) -> KernelSet:
    attention = attention_for(attention_impl, target, dtype, qk_head_dim, v_head_dim)
    if mode == "pallas":
        _check_pallas_target(target)
    if mode == "reference" or target.platform not in PALLAS_PLATFORMS:
        return KernelSet(target.name, attention=attention)
    # The all-to-all kernels move data between chips; interpreted (no CPU simulation of them here), lax's.
    exchange = "lax" if target.interpret or exchange_impl == "lax" else {"tpu": "tpu", "hopper": "gpu"}[target.platform]
    if target.platform == "tpu":
        return KernelSet(target.name, "tpu", "tpu", "tpu", exchange, attention, target.interpret)
    # Hopper: the Mosaic GPU grouped matmul and the Pallas GPU dispatch take bf16/fp16 operands.
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if mode == "pallas" and not low_precision:
        raise ConfigError(f"model.kernels='pallas': {target.name} has no Pallas grouped matmul or dispatch for "
                          f"model.dtype={dtype} (they compute in bfloat16 or float16); use model.kernels=auto (the "
                          f"references there) or model.dtype=bfloat16")
    moe = "gpu" if low_precision else "reference"
    return KernelSet(target.name, "gpu", moe, moe, exchange, attention, target.interpret)


def attention_for(impl: str, target: Target, dtype: str, qk_head_dim: int, v_head_dim: int) -> str:
    """model.attention_impl for `target`: `impl` itself unless it is auto, which picks what a real chip runs: xla on
    CPUs (exact, and the fastest there), splash on TPUs, on GPUs cudnn where it takes the shapes (bf16/fp16, head dims
    multiples of 8 up to 256 on Hopper or 128 before, v no wider than q/k) and JAX no longer asks it for the packed-
    document mask's gradient (0.11+), blockwise otherwise. The interpreted targets use xla (fused attention libraries
    have no CPU interpreter)."""
    if impl != "auto":
        return impl
    if target.interpret or target.platform == "cpu":
        return "xla"
    if target.platform == "tpu":
        return "splash"
    hopper = target.platform == "hopper"
    fits = (dtype in ("bfloat16", "float16") and qk_head_dim % 8 == 0 and qk_head_dim <= (256 if hopper else 128)
            and v_head_dim <= qk_head_dim)
    return "cudnn" if fits and _cudnn_skips_mask_gradient() else "blockwise"


def _cudnn_skips_mask_gradient() -> bool:
    major, minor = (int(part) for part in jax.__version__.split(".")[:2])
    return (major, minor) >= (0, 11)
