"""Model FLOPs utilisation: achieved model FLOP/s over the devices' dense BF16 peak, from one table of peaks keyed by
JAX's `device_kind` (real chips, and the compile-only devices of sharding.targets)."""

from __future__ import annotations

import jax

# Dense BF16 peak FLOP/s per device, by substring of `device_kind` (first match wins, so a longer name comes before a
# prefix of it). JAX's TPU kinds: v4 "TPU v4", v5e "TPU v5 lite", v5p "TPU v5" (or "TPU v5p"), v6e "TPU v6 lite".
PEAK_FLOPS = (
    ("H100", 989e12), ("H800", 989e12), ("H200", 989e12), ("H20", 148e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10G", 70e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
)


def peak_flops_for_kind(device_kind: str) -> float | None:
    """The table's peak for a `device_kind` string; None where the peak is unknown (CPUs)."""
    for name, flops in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def peak_flops_per_device(device=None) -> float | None:
    """The peak of `device` (default: JAX's first device); None where it is unknown: MFU is then not reported."""
    device = device or jax.devices()[0]
    return peak_flops_for_kind(getattr(device, "device_kind", ""))


def mfu(tokens_per_second: float, flops_per_token: float, n_devices: int, peak: float | None) -> float | None:
    if not peak:
        return None
    return tokens_per_second * flops_per_token / (n_devices * peak)
