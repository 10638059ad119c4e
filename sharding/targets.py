"""Compile-only devices for chips this machine does not have (H100s, TPU topologies): XLA compiles for them, nothing
runs on them; and `platform_of`, the kernel platform of a device.
"""

from __future__ import annotations

import functools
import math
import os
import re

# NVIDIA H100 SXM5 80 GB, public figures: 132 SMs at up to 1.98 GHz, compute capability 9.0, 228 KiB shared memory
# per SM of which 227 KiB a block can opt in to, 64 Ki 32-bit registers per SM and per block, 50 MiB L2, 80 GiB
# HBM3 at 3.35 TB/s, 128 FP32 lanes per SM.
H100_SXM = dict(
    description="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), sm_count=132, clock_ghz=1.98,
    shared_memory_per_block=48 * 1024, shared_memory_per_block_optin=232_448, shared_memory_per_sm=233_472,
    registers_per_sm=65_536, registers_per_block=65_536, threads_per_block=1024, threads_per_sm=2048,
    fp32_lanes_per_sm=128, l2_bytes=50 * 2**20, memory_bytes=80 * 2**30, memory_bandwidth=3_352_320_000_000,
)
GPUS_PER_NODE = 8
CUDNN_VERSION = (9, 8, 0)   # the cuDNN the CUDA wheels bring; XLA picks fused-attention support by it


class TargetError(ValueError):
    """A target name that names no chip this module can describe; the message says what is accepted."""


def gpu_target_config(spec: dict = H100_SXM) -> str:
    """The GpuTargetConfigProto (text form) XLA's GPU compiler takes for a chip it cannot query."""
    major, minor = spec["compute_capability"]
    cudnn = CUDNN_VERSION
    return "\n".join([
        "gpu_device_info {",
        f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
        f"  threads_per_block_limit: {spec['threads_per_block']}",
        "  threads_per_warp: 32",
        f"  shared_memory_per_block: {spec['shared_memory_per_block']}",
        f"  shared_memory_per_block_optin: {spec['shared_memory_per_block_optin']}",
        f"  shared_memory_per_core: {spec['shared_memory_per_sm']}",
        f"  threads_per_core_limit: {spec['threads_per_sm']}",
        f"  core_count: {spec['sm_count']}",
        f"  fpus_per_core: {spec['fp32_lanes_per_sm']}",
        "  block_dim_limit_x: 2147483647",
        "  block_dim_limit_y: 65535",
        "  block_dim_limit_z: 65535",
        f"  memory_bandwidth: {spec['memory_bandwidth']}",
        f"  l2_cache_size: {spec['l2_bytes']}",
        f"  clock_rate_ghz: {spec['clock_ghz']}",
        f"  device_memory_size: {spec['memory_bytes']}",
        f"  registers_per_core_limit: {spec['registers_per_sm']}",
        f"  registers_per_block_limit: {spec['registers_per_block']}",
        "}",
        'platform_name: "CUDA"',
        f"dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} patch: {cudnn[2]} }}",
        f'device_description_str: "{spec["description"]}"',
    ])


_H100 = re.compile(r"^h100(?:x(\d+))?$")
_TPU = re.compile(r"^(v5e|v5p|v6e|v5litepod|v6litepod):(\d+(?:x\d+){1,2})$")   # one device a chip
_TPU_CHIP = re.compile(r"^(v5e|v5p|v6e):1$")
_SMALLEST_HOST = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
TARGET_HELP = "cpu, h100, h100xN, v5e:1 (one chip; v5p:1, v6e:1 too), or a TPU topology such as v5e:2x2, v5p:2x2x1, " \
              "v6e:2x4, v5p:8x8x8"
# HBM per chip by device_kind: what libtpu reports as available when a compile does not fit (v5p), else the chip's
# public figure (v5e 16 GiB, v6e 32 GiB).
TPU_HBM_BYTES = {"TPU v5": int(95.74 * 2**30), "TPU v5 lite": 16 * 2**30, "TPU v6 lite": 32 * 2**30}


def check_name(name: str) -> str:
    """`name` if it names a target (syntax only, nothing imported); TargetError otherwise."""
    if name == "cpu" or _TPU.match(name) or _TPU_CHIP.match(name):
        return name
    m = _H100.match(name)
    if m and (m.group(1) is None or int(m.group(1)) >= 1):
        return name
    raise TargetError(f"target {name!r} is not one of: {TARGET_HELP}")


def is_compile_only(name: str) -> bool:
    return check_name(name) != "cpu"


PLATFORMS = ("cpu", "gpu", "hopper", "tpu")   # what platform_of tells apart: the kernels differ between them


def platform_of(device) -> str:
    """'tpu', 'hopper' (an NVIDIA GPU of compute capability 9.x: H100 / H200 / H800), 'gpu' or 'cpu' for a JAX device,
    compile-only devices included: the one place the project tells chips apart."""
    if device.platform == "tpu":
        return "tpu"
    if device.platform in ("gpu", "cuda", "rocm"):
        return "hopper" if str(getattr(device, "compute_capability", "")).startswith("9") else "gpu"
    return "cpu"


def target_platform(name: str) -> str:
    """platform_of the chips a target names, from the name alone (nothing imported): 'cpu', 'hopper' or 'tpu'."""
    name = check_name(name)
    return "cpu" if name == "cpu" else ("hopper" if name.startswith("h100") else "tpu")


def device_count(name: str) -> int | None:
    """Chips the target has (None for cpu: what the host offers). A TPU topology counts chips (v5p:2x2x1 → 4)."""
    name = check_name(name)
    if name == "cpu":
        return None
    m = _H100.match(name)
    if m:
        return int(m.group(1) or 1)
    if _TPU_CHIP.match(name):
        return 1
    return math.prod(int(d) for d in _TPU.match(name).group(2).split("x"))


def devices(name: str) -> list:
    """The target's devices (compile-only unless `cpu`), cached per process.

        devices("v5p:2x2x1")   4 TPU v5p chips (libtpu, from `pip install "jax[tpu]"`); any TPU topology name
        devices("v5e:1")       one chip of a v5e host (also v5p:1, v6e:1): libtpu describes no 1-chip topology
        devices("h100")        one H100 SXM (the CUDA plugin, from `pip install "jax[cuda12]"`, ptxas included)
        devices("h100x8")      8 H100s; `h100xN` for any N (the topology is 1 × ⌈N/8⌉ nodes × 8 GPUs)
        devices("cpu")         this host's (possibly simulated) CPU devices, which do run

    Use them as the devices of a `jax.sharding.Mesh` and lower with `jax.ShapeDtypeStruct(shape, dtype,
    sharding=...)` for every argument (no array can be placed on a compile-only device), then `.compile()`:
    `memory_analysis()` gives per-device bytes, and on TPU `cost_analysis()` has XLA's TPU cost model.

    The H100 is described from the chip's public figures (H100_SXM); the CUDA plugin needs no driver for this, but
    its import checks for one unless JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1, which this sets. libtpu takes a lock per
    process; ALLOW_MULTIPLE_LIBTPU_LOAD=1 (set here too) lets several processes (test workers) load it."""
    return list(_devices(check_name(name)))


@functools.lru_cache(maxsize=None)
def _devices(name: str) -> tuple:
    import jax
    if name == "cpu":
        return tuple(jax.devices("cpu"))
    from jax.experimental import topologies
    if name.startswith("h100"):
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        n = device_count(name)
        nodes = -(-n // GPUS_PER_NODE)
        per_node = min(n, GPUS_PER_NODE)
        try:
            topology = topologies.get_topology_desc(platform="cuda", topology=f"1x{nodes}x{per_node}",
                                                    target_config=gpu_target_config())
        except Exception as e:  # noqa: BLE001 - the plugin's absence surfaces as several exception types
            raise TargetError(f"target {name!r}: cannot describe compile-only H100s ({type(e).__name__}: {e}); "
                              f'install the CUDA plugin: pip install "jax[cuda12]=={jax.__version__}"') from None
        return tuple(topology.devices[:n])
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if _TPU_CHIP.match(name):
        return _devices(_SMALLEST_HOST[name.split(":")[0]])[:1]
    try:
        topology = topologies.get_topology_desc(topology_name=name, platform="tpu")
    except Exception as e:  # noqa: BLE001
        raise TargetError(f"target {name!r}: cannot describe compile-only TPUs ({type(e).__name__}: {e}); "
                          f'install libtpu: pip install "jax[tpu]=={jax.__version__}"') from None
    return tuple(topology.devices)
