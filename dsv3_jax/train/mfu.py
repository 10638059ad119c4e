"""Model FLOPs utilisation: achieved model FLOP/s over the devices' dense BF16 peak."""

from __future__ import annotations

import jax

# Dense BF16 peak FLOP/s per device, by substring of `device_kind` (first match wins).
PEAK_FLOPS = (
    ("H100", 989e12), ("H800", 989e12), ("H200", 989e12), ("H20", 148e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10G", 70e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
)


def peak_flops_per_device(device=None) -> float | None:
    """None where the peak is unknown (CPUs): MFU is then not reported."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return None


def mfu(tokens_per_second: float, flops_per_token: float, n_devices: int, peak: float | None) -> float | None:
    if not peak:
        return None
    return tokens_per_second * flops_per_token / (n_devices * peak)
