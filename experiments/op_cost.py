"""What one scheduled HLO operation costs on a chip: its matmul FLOPs at the rate for their number format and its HBM
bytes (operands + results, only the slices a fusion reads), each at the chip's achieved rate; the longer one wins."""

from __future__ import annotations

import dataclasses
import math

from experiments.hardware import MEMORY, Chip, dot_rate
from experiments.hlo_module import Array, Computation, Instruction, Module, ints

# Operations that move no data of their own (views, tuples, markers) or whose cost is counted elsewhere.
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id",
        "opt-barrier", "add-dependency", "domain", "copy-start", "copy-done", "slice-start", "slice-done", "while",
        "call", "conditional", "async-start", "async-update", "async-done", "call-start", "call-done", "send-done",
        "recv-done"}
# Custom calls that are bookkeeping, not work (ConcatBitcast: XLA:TPU's view of adjacent slices as one array).
FREE_CUSTOM_CALLS = {"AllocateBuffer", "AssumeGatherIndicesInBound", "ConcatBitcast", "PrepareAsyncCallStart",
                     "PrepareAsyncCallDone", "Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape",
                     "annotate_device_placement"}
_SLICING = {"dynamic-slice", "slice", "gather"}
_FORMAT_ORDER = ("int8", "fp8", "bf16", "f32")


@dataclasses.dataclass(frozen=True)
class Matmul:
    """FLOPs of matmuls in one number format at one XLA operand precision."""
    flops: float
    number_format: str
    precision: str = "DEFAULT"


@dataclasses.dataclass(frozen=True)
class OpCost:
    """One operation: matmul FLOPs, HBM bytes, seconds on the chip, the kind of work that set the time (a
    hardware kind: gemm, gemm_fp8, memory), and `unpriced`, a note when part of it could not be seen (a kernel
    without a cost estimate)."""
    flops: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0
    kind: str = MEMORY
    unpriced: str | None = None


def number_format(dtypes: list[str]) -> str:
    """The format a matmul of operands in these element types runs in: FP8 only if all are, else the widest."""
    formats = []
    for dtype in dtypes:
        if dtype.startswith("f8") or dtype.startswith("f4"):
            formats.append("fp8")
        elif dtype in ("bf16", "f16"):
            formats.append("bf16")
        elif dtype in ("f32", "f64", "c64", "c128"):
            formats.append("f32")
        elif dtype in ("s8", "u8", "s4", "u4"):
            formats.append("int8")
    return max(formats, key=_FORMAT_ORDER.index) if formats else "bf16"


_ALGORITHMS = {"dot_bf16_bf16_f32": ("bf16", "DEFAULT"), "dot_bf16_bf16_f32_x3": ("f32", "HIGH"),
               "dot_bf16_bf16_f32_x6": ("f32", "HIGHEST"), "dot_tf32_tf32_f32": ("f32", "DEFAULT"),
               "dot_tf32_tf32_f32_x3": ("f32", "HIGH"), "dot_f32_f32_f32": ("f32", "HIGHEST")}


def _precision(values: list[str]) -> str:
    order = ("DEFAULT", "HIGH", "HIGHEST")
    values = [v.upper() for v in values if v.upper() in order]
    return max(values, key=order.index) if values else "DEFAULT"


def dot_matmul(computation: Computation, dot: Instruction) -> Matmul:
    """2 × output elements × the contracted size, in the operands' format at the dot's precision."""
    lhs, rhs = (computation.by_name[name] for name in dot.operands[:2])
    contracted = math.prod(lhs.arrays[0].dims[d] for d in ints(dot.attribute("lhs_contracting_dims") or ""))
    fmt = number_format([lhs.arrays[0].dtype, rhs.arrays[0].dtype])
    precision = _precision((dot.attribute("operand_precision") or "").strip("{}").split(","))
    algorithm = (dot.attribute("algorithm") or "").lower()
    if algorithm in _ALGORITHMS:
        fmt, precision = _ALGORITHMS[algorithm]
    return Matmul(2.0 * dot.arrays[0].elements * contracted, fmt, precision)


def _window(text: str | None, rank: int) -> list[dict]:
    """Per spatial dimension: size, stride, pad_lo, lhs_dilate, rhs_dilate from `window={size=1x4 pad=0_0x3_3 ...}`."""
    dims = [dict(size=1, stride=1, pad_lo=0, lhs_dilate=1, rhs_dilate=1) for _ in range(rank)]
    for field in (text or "").strip("{}").split():
        key, _, value = field.partition("=")
        for d, item in enumerate(value.split("x")[:rank]):
            if key == "pad":
                dims[d]["pad_lo"] = int(item.split("_")[0])
            elif key in ("size", "stride", "lhs_dilate", "rhs_dilate"):
                dims[d][key] = int(item)
    return dims


def _valid_taps(out_size: int, in_size: int, w: dict) -> int:
    """(output position, window tap) pairs of one spatial dimension that land on a real (not padded) input."""
    extent = (in_size - 1) * w["lhs_dilate"]
    count = 0
    for k in range(w["size"]):
        offset = k * w["rhs_dilate"] - w["pad_lo"]
        if w["lhs_dilate"] == 1:   # positions o·stride + offset within [0, extent]
            lo = max(0, -(-(-offset) // w["stride"]))
            hi = min(out_size - 1, (extent - offset) // w["stride"]) if extent >= offset else -1
            count += max(0, hi - lo + 1)
        else:
            count += sum(1 for o in range(out_size) if 0 <= o * w["stride"] + offset <= extent
                         and (o * w["stride"] + offset) % w["lhs_dilate"] == 0)
    return count


def convolution_matmul(computation: Computation, conv: Instruction) -> Matmul:
    """A convolution (how XLA:TPU writes a dot): 2 × output batch × output features × input features per group ×
    the valid taps of every spatial dimension."""
    lhs, rhs = (computation.by_name[name] for name in conv.operands[:2])
    labels = conv.attribute("dim_labels") or "bf_io->bf"
    lhs_labels, rest = labels.split("_", 1)
    rhs_labels, out_labels = rest.split("->")
    lhs_dims, rhs_dims, out_dims = lhs.arrays[0].dims, rhs.arrays[0].dims, conv.arrays[0].dims
    spatial = [c for c in out_labels if c.isdigit()]
    window = _window(conv.attribute("window"), len(spatial))
    taps = 1
    for c in spatial:
        d = int(c)
        taps *= _valid_taps(out_dims[out_labels.index(c)], lhs_dims[lhs_labels.index(c)], window[d])
    flops = 2.0 * out_dims[out_labels.index("b")] * out_dims[out_labels.index("f")] * rhs_dims[rhs_labels.index("i")]
    fmt = number_format([lhs.arrays[0].dtype, rhs.arrays[0].dtype])
    precision = _precision((conv.attribute("operand_precision") or "").strip("{}").split(","))
    return Matmul(flops * taps, fmt, precision)


def _cublas_matmul(computation: Computation, call: Instruction) -> Matmul:
    config = call.backend_config.get("gemm_backend_config", {})
    lhs = computation.by_name[call.operands[0]].arrays[0]
    rhs = computation.by_name[call.operands[1]].arrays[0]
    dims = config.get("dot_dimension_numbers", {}).get("lhs_contracting_dimensions", [])
    contracted = math.prod(lhs.dims[int(d)] for d in dims)
    precision = _precision(config.get("precision_config", {}).get("operand_precision", []))
    return Matmul(2.0 * call.arrays[0].elements * contracted, number_format([lhs.dtype, rhs.dtype]), precision)


def matmul_shaped_flops(operands: list[Array], result: Array) -> float | None:
    """FLOPs of a kernel that is a (grouped) matmul, read off its shapes where they say so unambiguously: out
    [M, N] from x [M, K] and W [..., K, N] (or [..., N, K]); or out [..., P, Q] from xᵀ·dy with x [R, P], dy [R, Q].
    None for any other kernel."""
    floats = sorted((a for a in operands if a.dtype[0] in "fb" and len(a.dims) >= 2), key=lambda a: -a.elements)
    if len(floats) < 2 or len(result.dims) < 2:
        return None
    a, b = floats[:2]
    m, n = result.dims[-2:]
    for x, w in ((a, b), (b, a)):
        if len(result.dims) == 2 and len(x.dims) == 2 and x.dims[0] == m:
            k = x.dims[1]
            if tuple(w.dims[-2:]) in ((k, n), (n, k)):
                return 2.0 * m * k * n
        if len(x.dims) == 2 and len(w.dims) == 2 and x.dims[0] == w.dims[0] and (x.dims[1], w.dims[1]) == (m, n):
            return 2.0 * x.dims[0] * m * n
    return None


def _operands(computation: Computation, instruction: Instruction) -> list[Instruction]:
    return [computation.by_name[name] for name in instruction.operands if name in computation.by_name]


def custom_call_cost(computation: Computation, call: Instruction) -> tuple[list[Matmul], float | None, str | None]:
    """(matmuls, HBM bytes or None for operands + results, what could not be priced) of a custom call: cuBLAS
    GEMMs from their dot dimensions; Pallas TPU kernels from the cost estimate they carry; other kernels (Mosaic
    GPU, whose lowering drops the estimate) by their bytes, with FLOPs when their shapes are a matmul's."""
    target = (call.attribute("custom_call_target") or "").strip('"')
    if target in FREE_CUSTOM_CALLS:
        return [], 0.0, None
    if target.startswith("__cublas"):   # its result is (output, workspace); the workspace is scratch, not traffic
        moved = sum(o.nbytes for o in _operands(computation, call)) + call.arrays[0].nbytes
        return [_cublas_matmul(computation, call)], moved, None
    operands = [a for o in _operands(computation, call) for a in o.arrays]
    fmt = number_format([a.dtype for a in sorted(operands, key=lambda a: -a.nbytes)[:2]])
    estimate = call.backend_config.get("custom_call_config", {}).get("cost_estimate")
    if estimate is not None:
        return [Matmul(float(estimate.get("flops", 0)), fmt)], float(estimate.get("bytes_accessed", 0)), None
    results = call.arrays
    flops = matmul_shaped_flops(operands, max(results, key=lambda a: a.elements)) if results else None
    name = call.name.split(".")[0]
    if flops is None:
        return [], None, f"{target}:{name} (bytes only)"
    return [Matmul(flops, fmt)], None, f"{target}:{name} (FLOPs from its shapes)"


# ---------------------------------------------------------------------------------------------------------------
# Fusions


def computation_matmuls(module: Module, name: str, memo: dict) -> tuple[Matmul, ...]:
    """Every dot and convolution in a (fused) computation and the computations it calls; `memo` keeps each
    computation's list by name."""
    if name in memo:
        return memo[name]
    computation = module.computations[name]
    out: list[Matmul] = []
    for instruction in computation.instructions:
        if instruction.opcode == "dot":
            out.append(dot_matmul(computation, instruction))
        elif instruction.opcode == "convolution":
            out.append(convolution_matmul(computation, instruction))
        elif instruction.opcode in ("fusion", "call"):
            for callee in instruction.called("calls") + instruction.called("to_apply"):
                out.extend(computation_matmuls(module, callee, memo))
    memo[name] = tuple(out)
    return memo[name]


def hbm_bytes(instruction: Instruction, chip: Chip) -> float:
    """Bytes of an instruction's result that live in HBM (on a TPU, arrays in on-chip memory do not)."""
    return sum(a.nbytes for a in instruction.arrays if a.memory_space != chip.on_chip_memory_space)


def _bytes_read(callee: Computation, name: str, full: float) -> float:
    """Bytes a fused computation reads of the value `name` whose HBM size is `full`: only the slices when it only
    slices it, nothing when it only updates it in place, else all of it."""
    total = 0.0
    for user in callee.users.get(name, []):
        if user.opcode == "bitcast":
            total += _bytes_read(callee, user.name, full)
        elif user.opcode in _SLICING and user.operands[0] == name:
            total += user.nbytes
        elif user.opcode == "dynamic-update-slice" and user.operands[0] == name and user.operands.count(name) == 1:
            continue
        else:
            return full
    return min(total, full)


def _bytes_written(callee: Computation, instruction: Instruction) -> float:
    """Bytes a fused computation's root writes: an in-place update writes only the update."""
    while instruction.opcode == "bitcast" and instruction.operands:
        instruction = callee.by_name[instruction.operands[0]]
    if instruction.opcode == "tuple":
        return sum(_bytes_written(callee, callee.by_name[name]) for name in instruction.operands)
    if instruction.opcode == "dynamic-update-slice":
        return callee.by_name[instruction.operands[1]].nbytes
    return instruction.nbytes


def fusion_bytes(module: Module, computation: Computation, fusion: Instruction, chip: Chip) -> float:
    """HBM bytes of a fusion: what it reads of each operand in HBM, and what it writes of each result in HBM."""
    callee = module.computations[fusion.called("calls")[0]]
    read = 0.0
    for index, operand in enumerate(_operands(computation, fusion)):
        parameter = callee.parameter(index)
        full = hbm_bytes(operand, chip)
        read += full if parameter is None or full == 0 else _bytes_read(callee, parameter.name, full)
    root = callee.root
    results = fusion.arrays
    in_hbm = [a.memory_space != chip.on_chip_memory_space for a in results]
    if root.opcode == "tuple" and len(root.operands) == len(results):
        written = sum(_bytes_written(callee, callee.by_name[name])
                      for name, hbm in zip(root.operands, in_hbm) if hbm)
    else:
        written = _bytes_written(callee, root) if all(in_hbm) else hbm_bytes(fusion, chip)
    return read + written


def data_bytes(module: Module, computation: Computation, instruction: Instruction, chip: Chip) -> float:
    """HBM bytes an unfused operation moves: a slice reads what it writes; an update, gather or scatter touches
    only the rows it moves (and its indices); anything else reads its operands and writes its result. Arrays in a
    TPU's on-chip memory are not counted."""
    operands = _operands(computation, instruction)
    opcode = instruction.opcode
    if opcode == "fusion":
        return fusion_bytes(module, computation, instruction, chip)
    if opcode in ("dynamic-slice", "slice"):
        return hbm_bytes(instruction, chip) + min(instruction.nbytes, hbm_bytes(operands[0], chip))
    if opcode == "dynamic-update-slice":
        return hbm_bytes(operands[1], chip) + min(operands[1].nbytes, hbm_bytes(instruction, chip))
    if opcode == "gather":
        return hbm_bytes(instruction, chip) + min(instruction.nbytes, hbm_bytes(operands[0], chip)) + hbm_bytes(
            operands[1], chip)
    if opcode == "scatter":
        updates = sum(hbm_bytes(o, chip) for o in operands[2:])
        return updates + min(updates, hbm_bytes(instruction, chip)) + hbm_bytes(operands[1], chip)
    return sum(hbm_bytes(o, chip) for o in operands) + hbm_bytes(instruction, chip)


def priced(matmuls: list[Matmul] | tuple, nbytes: float, chip: Chip, unpriced: str | None = None) -> OpCost:
    """Each term at the chip's achieved rate for its kind of work; the operation takes the longer."""
    flop_seconds, by_kind = 0.0, {}
    for m in matmuls:
        rate, kind = dot_rate(chip, m.number_format, m.precision)
        seconds = m.flops / (rate * chip.efficiency[kind])
        flop_seconds += seconds
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    byte_seconds = nbytes / (chip.hbm_bytes_per_s * chip.efficiency[MEMORY])
    flops = sum(m.flops for m in matmuls)
    if flop_seconds > byte_seconds:
        return OpCost(flops, nbytes, flop_seconds, max(by_kind, key=by_kind.get), unpriced)
    return OpCost(flops, nbytes, byte_seconds, MEMORY, unpriced)


def op_cost(module: Module, computation: Computation, instruction: Instruction, chip: Chip, memo: dict) -> OpCost:
    """The cost of one compute operation of a scheduled computation (collectives and control flow are priced by
    experiments.estimate's walk; FREE ones cost nothing). `memo`: fused computations' matmuls, shared by calls."""
    opcode = instruction.opcode
    if opcode in FREE:
        return OpCost()
    if opcode == "custom-call":
        matmuls, nbytes, unpriced = custom_call_cost(computation, instruction)
        if nbytes is None:
            nbytes = sum(hbm_bytes(o, chip) for o in _operands(computation, instruction)) + hbm_bytes(instruction, chip)
        return priced(matmuls, nbytes, chip, unpriced)
    matmuls: tuple | list = ()
    if opcode == "fusion":
        matmuls = computation_matmuls(module, instruction.called("calls")[0], memo)
    elif opcode == "dot":
        matmuls = [dot_matmul(computation, instruction)]
    elif opcode == "convolution":
        matmuls = [convolution_matmul(computation, instruction)]
    return priced(matmuls, data_bytes(module, computation, instruction, chip), chip)

