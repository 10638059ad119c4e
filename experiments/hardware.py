"""What the step-time estimate (experiments.estimate) prices with: per chip, peak FLOP/s by number format, HBM and
link bandwidths, devices per node, and the fraction of peak each kind of work achieves. Every figure's source is
listed in BENCHMARKS.md ("Step-time estimate")."""

from __future__ import annotations

import dataclasses
from typing import Mapping

# Kinds of work an efficiency applies to.
GEMM = "gemm"          # dense matmuls in BF16 / FP16 / TF32 / FP32 / INT8
GEMM_FP8 = "gemm_fp8"  # FP8 matmuls (block-scaled in this project)
MEMORY = "memory"      # anything bound by HBM traffic: fusions, copies, a kernel's bytes
KINDS = (GEMM, GEMM_FP8, MEMORY)
# TPU MXUs take F32 operands as several BF16 passes: XLA's precision DEFAULT one, HIGH three, HIGHEST six.
TPU_F32_PASSES = {"DEFAULT": 1, "HIGH": 3, "HIGHEST": 6}


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator and the links it reaches its peers by.

    `scale_up_bytes_per_s`: what one device pushes into a collective over the links inside its node (GPU: NVLink,
    one direction) or its slice (TPU: the ICI bandwidth a ring gets, see `ici_ring_bytes_per_s`).
    `scale_out_bytes_per_s`: what it pushes over the network between nodes (GPU: its InfiniBand NIC, one
    direction); None where there is no such level (a TPU slice is one ICI domain). `efficiency`: the fraction of
    peak each kind of work runs at (KINDS), measured where the source says so."""
    name: str
    peak_flops: Mapping[str, float]          # by number format: bf16, fp8, f32, tf32, int8
    hbm_bytes_per_s: float
    scale_up_bytes_per_s: float
    scale_out_bytes_per_s: float | None
    devices_per_node: int | None
    efficiency: Mapping[str, float]
    platform: str                            # "gpu" or "tpu"
    on_chip_memory_space: int | None = None  # the HLO memory space of on-chip memory (TPU: 1, its vector memory)

    @property
    def bf16_flops(self) -> float:
        return self.peak_flops["bf16"]

    def rated(self, roofline: bool) -> "Chip":
        """This chip with every efficiency at 1 when `roofline` (peak rates), else itself."""
        return dataclasses.replace(self, efficiency={k: 1.0 for k in KINDS}) if roofline else self


def ici_ring_bytes_per_s(chip_gbit_per_s: float, links: int, ring_links: int = 2) -> float:
    """Bandwidth a ring collective gets on a TPU: the chip's ICI figure (all its links together, in Gbit/s) shared
    evenly by its links, of which a ring uses two (to the previous and the next chip)."""
    return chip_gbit_per_s * 1e9 / 8 * ring_links / links


TERA, GIGA = 1e12, 1e9
# H100 SXM5: dense tensor-core rates (no sparsity); HBM3; NVLink 4 is 900 GB/s both ways together, 450 GB/s each;
# one 400 Gbit/s NDR InfiniBand NIC per GPU. Efficiencies measured on one H100: XLA's 8192³ BF16 GEMM at
# 715 TFLOP/s; cuBLAS block-scaled FP8 4096×7168×16384 at 1,209 TFLOP/s; a device-to-device copy at 2,997 GB/s
# (read + written). FP32 and TF32 GEMMs are taken at the BF16 GEMM's fraction (not measured).
H100 = Chip(
    name="h100",
    peak_flops={"bf16": 989.4 * TERA, "fp8": 1978.9 * TERA, "f32": 66.9 * TERA, "tf32": 494.7 * TERA,
                "int8": 1978.9 * TERA},
    hbm_bytes_per_s=3350 * GIGA, scale_up_bytes_per_s=450 * GIGA, scale_out_bytes_per_s=50 * GIGA,
    devices_per_node=8, platform="gpu",
    efficiency={GEMM: 715 / 989.4, GEMM_FP8: 1209 / 1978.9, MEMORY: 2997 / 3350})
# The H800 cluster DeepSeek-V3 was trained on: H100 compute and HBM, NVLink at the 160 GB/s achieved there, and
# 50 GB/s of InfiniBand per GPU.
H800 = dataclasses.replace(H100, name="h800", scale_up_bytes_per_s=160 * GIGA)
# TPUs: no FP8 in the MXU (FP8 dots are priced at the BF16 rate); ICI in Gbit/s per chip over all links (v5p: six
# links of a 3D torus; v5e, v6e: four of a 2D torus). Efficiencies are what XLA's TPU cost model charges (no TPU
# measurement here): an 8192³ BF16 matmul at 394 of v5p's 459 TFLOP/s and at the full peak on v5e and v6e;
# elementwise traffic at 2,350 of 2,765 GB/s on v5p, 737.7 of 819 on v5e, 1,638 of 1,640 on v6e.
V5P = Chip(
    name="v5p", peak_flops={"bf16": 459 * TERA, "fp8": 459 * TERA, "int8": 918 * TERA},
    hbm_bytes_per_s=2765 * GIGA, scale_up_bytes_per_s=ici_ring_bytes_per_s(4800, links=6),
    scale_out_bytes_per_s=None, devices_per_node=None, platform="tpu", on_chip_memory_space=1,
    efficiency={GEMM: 394 / 459, GEMM_FP8: 394 / 459, MEMORY: 2350.4 / 2765})
V5E = Chip(
    name="v5e", peak_flops={"bf16": 197 * TERA, "fp8": 197 * TERA, "int8": 394 * TERA},
    hbm_bytes_per_s=819 * GIGA, scale_up_bytes_per_s=ici_ring_bytes_per_s(1600, links=4),
    scale_out_bytes_per_s=None, devices_per_node=None, platform="tpu", on_chip_memory_space=1,
    efficiency={GEMM: 1.0, GEMM_FP8: 1.0, MEMORY: 737.66 / 819})
V6E = Chip(
    name="v6e", peak_flops={"bf16": 918 * TERA, "fp8": 918 * TERA, "int8": 1836 * TERA},
    hbm_bytes_per_s=1640 * GIGA, scale_up_bytes_per_s=ici_ring_bytes_per_s(3584, links=4),
    scale_out_bytes_per_s=None, devices_per_node=None, platform="tpu", on_chip_memory_space=1,
    efficiency={GEMM: 1.0, GEMM_FP8: 1.0, MEMORY: 1638.0 / 1640})
CHIPS = {chip.name: chip for chip in (H100, H800, V5P, V5E, V6E)}
# JAX's device_kind -> chip, by substring, longest first ("TPU v5 lite" before "TPU v5").
DEVICE_KINDS = (("H100", "h100"), ("H800", "h800"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"),
                ("TPU v5p", "v5p"), ("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"), ("TPU v5", "v5p"))


class UnknownChip(ValueError):
    """A device kind or name with no figures here; the message lists the chips there are."""


def chip_for_kind(device_kind: str) -> Chip:
    """The chip of a JAX `device_kind` ('NVIDIA H100 80GB HBM3', 'TPU v5', 'TPU v5 lite', 'TPU v6 lite')."""
    for fragment, name in DEVICE_KINDS:
        if fragment.lower() in device_kind.lower():
            return CHIPS[name]
    raise UnknownChip(f"no figures for device kind {device_kind!r}; chips: {', '.join(CHIPS)}")


def chip_named(name: str) -> Chip:
    """The chip of a name: a chip ('h800', 'v5p') or a target made of one ('h100x16', 'h800x2048', 'v5p:2x2x1')."""
    key = name.split(":")[0].lower()
    key = key.split("x")[0] if key.startswith("h") else key
    if key not in CHIPS:
        raise UnknownChip(f"no figures for {name!r}; chips: {', '.join(CHIPS)} (or a target of them: h100x16, "
                          f"v5p:2x2x1)")
    return CHIPS[key]


def dot_rate(chip: Chip, number_format: str, precision: str = "DEFAULT") -> tuple[float, str]:
    """(peak FLOP/s, efficiency kind) of a matmul whose operands are in `number_format` ('bf16', 'fp8', 'f32',
    'int8') at XLA operand precision `precision`: F32 runs as TF32 on a GPU unless HIGHEST, as 1, 3 or 6 BF16 passes
    on a TPU; FP8 runs at the BF16 rate where the chip has none."""
    peaks = chip.peak_flops
    if number_format == "fp8":
        return peaks.get("fp8", peaks["bf16"]), GEMM_FP8
    if number_format == "f32":
        if chip.platform == "gpu":
            return (peaks["f32"] if precision == "HIGHEST" else peaks["tf32"]), GEMM
        return peaks["bf16"] / TPU_F32_PASSES.get(precision, 1), GEMM
    return peaks.get(number_format, peaks["bf16"]), GEMM
