"""A step-time estimate that sees overlap: the compiled program's schedule walked with a compute clock, operations
priced on the target's chip (experiments.op_cost), collectives on the links they cross (experiments.collectives);
`estimate(compiled, target)` returns an Estimate, `est_mfu` the MFU it implies. The model: `estimate`'s docstring."""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from experiments.collectives import KINDS, Links, Transfer, collective_kind, price_local, transfer
from experiments.hardware import KINDS as WORK_KINDS
from experiments.hardware import MEMORY, Chip, UnknownChip, chip_for_kind, chip_named
from experiments.hlo_module import Computation, Instruction, Module, parse_module, trip_count
from experiments.op_cost import OpCost, op_cost
from pallas_kernels.all_to_all.blocks import SCOPE_PREFIX as KERNEL_ALL_TO_ALL_SCOPE
from sharding.ep_exchange import SKEW_ONLY_SCOPE

_DONE = {"all-gather-done", "all-reduce-done", "reduce-scatter-done", "all-to-all-done", "collective-permute-done",
         "ragged-all-to-all-done", "async-done"}
_MOVES = {"copy-start": "copy-done", "slice-start": "slice-done"}   # asynchronous copies between memory spaces
# Custom calls XLA's TPU cost model prices at −1 s each, added back to its `optimal_seconds`.
XLA_UNPRICED_CALLS = ("PrepareAsyncCallStart", "PrepareAsyncCallDone", "ConcatBitcast")
INTERNODE = ":internode"   # the walk's byte counters: "<kind>:internode" holds the kind's bytes leaving the node


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Per device, per call of the program. Seconds: `compute_s` every operation at its achieved rate;
    `comm_s` every collective's transfer time; `exposed_comm_s` the part of it no compute covers (the clock's
    waits); `est_step_s` = compute_s + exposed_comm_s. `flops`: the matmul FLOPs the estimate counted (dots,
    convolutions, kernels' estimates; loops times their trip counts). `bytes_<kind>`: bytes each device sends for
    that kind of collective, by its algorithm (experiments.collectives.ring_bytes; a ragged all-to-all counts as an
    all-to-all of its whole input buffer). `xla_optimal_s` / `xla_flops`: XLA's own cost analysis where the backend
    has one (TPU: a plain sum, loop bodies once, no overlap; the −1 s it gives each XLA_UNPRICED_CALLS call added
    back), else None. `compute_by_kind`: compute seconds by the kind of work that set each op's time
    (experiments.hardware.KINDS). `async_collectives` / `sync_collectives`: collectives run, loops counted.
    `dynamic_loops`: loops counted once for want of a static trip count; `repeated_loops`: loops that run more
    than once (XLA's own sum counts each body once, so it is no step time where there are any); `unpriced`: kernels
    priced by their bytes alone or with FLOPs read off their shapes, by static occurrences in the program.
    `lockstep_ticks`: ticks of a tick loop priced by the branch its slowest device runs (`tick_branches`), 0: none.
    `bytes_internode[kind]`: of `bytes_<kind>`, those that leave the device's node (GPUs, 8 to a node by device id;
    a TPU slice is one domain: 0)."""
    chip: str
    roofline: bool
    compute_s: float
    comm_s: float
    exposed_comm_s: float
    est_step_s: float
    flops: float
    bytes_all_to_all: float
    bytes_all_gather: float
    bytes_reduce_scatter: float
    bytes_all_reduce: float
    bytes_collective_permute: float
    xla_optimal_s: float | None
    xla_flops: float | None
    compute_by_kind: dict[str, float]
    async_collectives: int
    sync_collectives: int
    dynamic_loops: tuple[str, ...]
    repeated_loops: tuple[str, ...]
    unpriced: dict[str, int]
    lockstep_ticks: int = 0
    bytes_internode: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def bytes_all_to_all_internode(self) -> float:
        """All-to-all bytes each device sends to other nodes (over InfiniBand on GPUs; 0 on a TPU slice)."""
        return self.bytes_internode.get("all-to-all", 0.0)

    @property
    def bytes_all_to_all_intranode(self) -> float:
        """All-to-all bytes each device sends inside its node (NVLink; on a TPU slice, all of them)."""
        return self.bytes_all_to_all - self.bytes_all_to_all_internode

    @property
    def comm_fraction(self) -> float:
        """Communication's share of the step if none of it overlapped: comm / (compute + comm)."""
        total = self.compute_s + self.comm_s
        return self.comm_s / total if total > 0 else 0.0

    @property
    def exposed_fraction(self) -> float:
        """The share of communication no compute covers."""
        return self.exposed_comm_s / self.comm_s if self.comm_s > 0 else 0.0

    def row(self) -> dict:
        """The scalar fields, as columns."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not isinstance(getattr(self, f.name), (dict, tuple))}


# ---------------------------------------------------------------------------------------------------------------
# Where the program runs


def program_devices(compiled) -> list | None:
    """The devices of a compiled program in partition order (its mesh's, for a program over NamedShardings; the one
    device of a single-device program); None when its shardings do not say."""
    leaves = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
    for sharding in leaves:
        if isinstance(sharding, NamedSharding):
            return list(sharding.mesh.devices.flat)
    sets = {frozenset(s.device_set) for s in leaves}
    if len(sets) == 1 and len(next(iter(sets))) == 1:
        return list(next(iter(sets)))
    return None


def _known_chip(device) -> Chip | None:
    try:
        return chip_for_kind(device.device_kind)
    except UnknownChip:
        return None


def links_for(compiled, target: str | Mesh | Sequence | None, n_partitions: int) -> Links:
    """The chip and each partition's node. `target`: None, the program's own devices; a chip or target name
    ('h800', 'h100x16', 'v5p:2x2x1'), that chip with the program's devices (or, where the program does not say,
    partition p on node p // 8); a Mesh or devices in partition order. GPUs sit 8 to a node by device id."""
    if isinstance(target, Mesh):
        devices = list(target.devices.flat)
    elif target is not None and not isinstance(target, str):
        devices = list(target)
    else:
        devices = program_devices(compiled)
    if devices is not None and len(devices) != n_partitions:
        raise ValueError(f"estimate: the program has {n_partitions} partitions but {len(devices)} devices were given")
    if isinstance(target, str):
        chip = chip_named(target)
        compiled_for = _known_chip(devices[0]) if devices else None
        if compiled_for is not None and compiled_for.platform != chip.platform:
            raise ValueError(f"estimate: the program was compiled for {compiled_for.name}, not a {chip.platform} "
                             f"chip like {chip.name}: compile it for {target}")
    elif devices:
        chip = _known_chip(devices[0])
        if chip is None:
            raise UnknownChip(f"estimate: no figures for the program's devices ({devices[0].device_kind!r}); name a "
                              f"chip or target: estimate(compiled, 'h100x8')")
    else:
        raise ValueError("estimate: the program's devices are unknown; pass a target name, a Mesh or the devices")
    if chip.devices_per_node is None:
        return Links(chip, None)
    ids = [d.id for d in devices] if devices is not None else list(range(n_partitions))
    return Links(chip, tuple(i // chip.devices_per_node for i in ids))


# ---------------------------------------------------------------------------------------------------------------
# The walk


@dataclasses.dataclass(frozen=True)
class Totals:
    """What one run of a computation costs: compute, transfer and exposed seconds, FLOPs, bytes sent by kind,
    compute seconds by kind of work, collectives run asynchronously and synchronously."""
    compute_s: float = 0.0
    comm_s: float = 0.0
    exposed_s: float = 0.0
    flops: float = 0.0
    bytes_sent: tuple[tuple[str, float], ...] = ()
    by_kind: tuple[tuple[str, float], ...] = ()
    async_count: int = 0
    sync_count: int = 0

    @property
    def duration_s(self) -> float:
        return self.compute_s + self.exposed_s


class _Timeline:
    """One run of a computation as it is walked: the compute clock, the collectives' queue and the copies' queue
    (each free from some time on), the transfers in flight by the name of their start, and the running totals."""

    def __init__(self):
        self.clock = self.queue_free = self.copies_free = 0.0
        self.in_flight: dict[str, float] = {}
        self.copying: dict[str, float] = {}
        self.compute_s = self.comm_s = self.exposed_s = self.flops = 0.0
        self.bytes_sent: collections.Counter = collections.Counter()
        self.by_kind: collections.Counter = collections.Counter()
        self.async_count = self.sync_count = 0

    def compute(self, cost: OpCost) -> None:
        self.compute_s += cost.seconds
        self.flops += cost.flops
        self.by_kind[cost.kind] += cost.seconds
        self.clock += cost.seconds

    def collective(self, name: str, t: Transfer, asynchronous: bool) -> None:
        """Queue a transfer; a synchronous one holds the clock until it is done."""
        self.queue_free = max(self.clock, self.queue_free) + t.seconds
        self.comm_s += t.seconds
        self.bytes_sent[t.kind] += t.bytes_sent
        self.bytes_sent[t.kind + INTERNODE] += t.bytes_internode
        self.async_count += asynchronous
        self.sync_count += not asynchronous
        if asynchronous:
            self.in_flight[name] = self.queue_free
        else:
            self.wait_for_transfer(self.queue_free)

    def wait_for_transfer(self, end: float) -> None:
        if end > self.clock:
            self.exposed_s += end - self.clock
            self.clock = end

    def copy(self, name: str, seconds: float) -> None:
        self.copies_free = max(self.clock, self.copies_free) + seconds
        self.copying[name] = self.copies_free

    def wait_for_copy(self, end: float) -> None:
        """A stall on HBM traffic the compute did not cover: compute time, of the memory kind."""
        if end > self.clock:
            self.compute(OpCost(seconds=end - self.clock, kind=MEMORY))

    def block(self, block: Totals, times: float = 1.0) -> None:
        """A loop body, branch or call run `times` over: its totals added, the clock advanced by its duration."""
        self.compute_s += times * block.compute_s
        self.comm_s += times * block.comm_s
        self.exposed_s += times * block.exposed_s
        self.flops += times * block.flops
        for kind, value in block.bytes_sent:
            self.bytes_sent[kind] += times * value
        for kind, value in block.by_kind:
            self.by_kind[kind] += times * value
        self.async_count += round(times * block.async_count)
        self.sync_count += round(times * block.sync_count)
        self.clock += times * block.duration_s

    def finish(self) -> Totals:
        """Totals once every transfer and copy still in flight is done."""
        self.wait_for_transfer(max(self.in_flight.values(), default=0.0))
        self.wait_for_copy(max(self.copying.values(), default=0.0))
        return Totals(self.compute_s, self.comm_s, self.exposed_s, self.flops, tuple(sorted(self.bytes_sent.items())),
                      tuple(sorted(self.by_kind.items())), self.async_count, self.sync_count)


def _op_name(instruction: Instruction) -> str:
    m = re.search(r'op_name="([^"]*)"', instruction.attribute("metadata") or "")
    return m.group(1) if m else ""


def kernel_all_to_all_group(instruction: Instruction) -> int | None:
    """The devices a Pallas all-to-all kernel (pallas_kernels.all_to_all, a custom call to XLA) exchanges among,
    read off its name scope; None for any other instruction."""
    if instruction.opcode != "custom-call":
        return None
    m = re.search(re.escape(KERNEL_ALL_TO_ALL_SCOPE) + r"(\d+)", _op_name(instruction))
    return int(m.group(1)) if m else None


class _Walker:
    """Walks computations in schedule order, each once (memoized by name), pricing on `links`' chip."""

    def __init__(self, module: Module, links: Links, chip: Chip, tick_branches: np.ndarray | None = None):
        self.module, self.links, self.chip = module, links, chip
        self.tick_branches = tick_branches
        self.lockstep_ticks = 0
        self.memo: dict[str, Totals] = {}
        self.matmul_memo: dict = {}
        self.fused_collectives: dict[str, list] = {}
        self.dynamic_loops: dict[str, None] = {}
        self.repeated_loops: dict[str, None] = {}
        self.unpriced: collections.Counter = collections.Counter()

    def transfer(self, instruction: Instruction, computation: Computation) -> Transfer:
        return transfer(instruction, computation, self.links, self.module.num_partitions)

    def _async_collective(self, start: Instruction) -> Transfer | None:
        """The transfer of an `async-start` that wraps a collective (None: it wraps other work)."""
        for name in start.called("calls"):
            callee = self.module.computations[name]
            for inner in callee.instructions:
                if collective_kind(inner.opcode):
                    return self.transfer(inner, callee)
        return None

    def walk(self, name: str) -> Totals:
        if name not in self.memo:
            self.memo[name] = self._walk(self.module.computations[name])
        return self.memo[name]

    def _walk(self, computation: Computation, forced: tuple[str, int] | None = None) -> Totals:
        """One run of `computation`; `forced` = (conditional, branch): that conditional runs that branch."""
        timeline = _Timeline()
        for instruction in computation.instructions:
            opcode = instruction.opcode
            wrapped = self._async_collective(instruction) if opcode == "async-start" else None
            if wrapped is not None:
                timeline.collective(instruction.name, wrapped, asynchronous=True)
            elif collective_kind(opcode) is not None:
                timeline.collective(instruction.name, self.transfer(instruction, computation),
                                    asynchronous=opcode.endswith("-start"))
            elif opcode in _DONE:
                timeline.wait_for_transfer(timeline.in_flight.pop(next(iter(instruction.operands), ""), 0.0))
            elif opcode in _MOVES:
                timeline.copy(instruction.name, self._copy_seconds(instruction, computation))
            elif opcode in _MOVES.values():
                timeline.wait_for_copy(timeline.copying.pop(next(iter(instruction.operands), ""), 0.0))
            elif opcode == "while":
                trips = trip_count(self.module, computation, instruction)
                if trips is None:
                    self.dynamic_loops[f"{instruction.name} ({_op_name(instruction)})"] = None
                    trips = 0 if SKEW_ONLY_SCOPE in _op_name(instruction) else 1
                elif trips > 1:
                    self.repeated_loops[f"{instruction.name} ({_op_name(instruction)}) x{trips}"] = None
                body = instruction.called("body")[0]
                ticks = self._lockstep(body, trips)
                for totals, times in ticks or [(self.walk(body), trips)]:
                    timeline.block(totals, times)
                timeline.block(self.walk(instruction.called("condition")[0]), trips + 1)
            elif opcode == "conditional":
                branches = instruction.called("branch_computations") or (
                    instruction.called("false_computation") + instruction.called("true_computation"))
                if forced is not None and forced[0] == instruction.name:
                    branches = branches[forced[1]:forced[1] + 1]
                timeline.block(max((self.walk(b) for b in branches), key=lambda t: t.duration_s))
            elif opcode in ("call", "async-start", "call-start"):
                for callee in instruction.called("to_apply") + instruction.called("calls"):
                    timeline.block(self.walk(callee))
            elif (group := kernel_all_to_all_group(instruction)) is not None:   # occupies the chip until done
                timeline.collective(instruction.name, self._kernel_all_to_all(instruction, computation, group),
                                    asynchronous=False)
            elif opcode in ("send", "recv"):
                self.unpriced[f"{opcode} (not priced)"] += 1
            else:
                cost = op_cost(self.module, computation, instruction, self.chip, self.matmul_memo)
                timeline.compute(cost)
                if cost.unpriced:
                    self.unpriced[cost.unpriced] += 1
                if opcode == "fusion":   # a collective fused into a kernel: the kernel waits for it
                    for inner, callee in self._fused_collectives(instruction):
                        timeline.collective(inner.name, self.transfer(inner, callee), asynchronous=False)
        return timeline.finish()

    def _kernel_all_to_all(self, call: Instruction, computation: Computation, group: int) -> Transfer:
        """A Pallas all-to-all kernel: its first operand's blocks go to the group's other devices, on the fast links
        (the kernels only run among devices that address each other's memory)."""
        operand = computation.by_name[call.operands[0]]
        return price_local("all-to-all", operand.nbytes, group, self.links)

    def _lockstep(self, body: str, trips: int) -> list[tuple[Totals, int]] | None:
        """A tick loop (`tick_branches` [devices, ticks] given, `trips` ticks, and one conditional in the body with
        a branch for every index the table names): per tick, the body with the branch of its slowest device, as
        (totals, ticks) pairs; None for any other loop (or one with several switches). Every device waits at each
        tick's messages for the slowest."""
        table = self.tick_branches
        if table is None or table.shape[1] != trips:
            return None
        computation = self.module.computations[body]
        switches = [i for i in computation.instructions if i.opcode == "conditional"
                    and len(i.called("branch_computations")) > int(table.max())]
        if len(switches) != 1:
            return None
        name = switches[0].name
        per_branch = {int(b): self._walk(computation, forced=(name, int(b))) for b in np.unique(table)}
        slowest = [max(set(column.tolist()), key=lambda b: per_branch[b].duration_s) for column in table.T]
        self.lockstep_ticks += trips
        return [(per_branch[b], n) for b, n in sorted(collections.Counter(slowest).items())]

    def _copy_seconds(self, start: Instruction, computation: Computation) -> float:
        """An asynchronous copy between memory spaces (a TPU's prefetch into its vector memory): the array its done
        returns, over HBM at the memory kind's rate."""
        done = next((u for u in computation.users.get(start.name, []) if u.opcode == _MOVES[start.opcode]), None)
        moved = done.nbytes if done is not None else 0.0
        return moved / (self.chip.hbm_bytes_per_s * self.chip.efficiency[MEMORY])

    def _fused_collectives(self, fusion: Instruction) -> list[tuple[Instruction, Computation]]:
        name = fusion.called("calls")[0]
        if name not in self.fused_collectives:
            callee = self.module.computations[name]
            self.fused_collectives[name] = [(i, callee) for i in callee.instructions if collective_kind(i.opcode)]
        return self.fused_collectives[name]


# ---------------------------------------------------------------------------------------------------------------
# The estimate


def _xla_cost(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - backends without a cost analysis raise several types
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return cost or {}


def estimate(compiled, target: str | Mesh | Sequence | None = None, *, roofline: bool = False,
             hlo_text: str | None = None, tick_branches: np.ndarray | None = None) -> Estimate:
    """The step-time Estimate of a compiled JAX program (`jax.jit(f).lower(...).compile()`, compile-only devices
    included) on `target` (links_for: None for the program's own devices and chip; a chip or target name such as
    'h800' or 'h100x16'; a Mesh). `roofline`: every rate at its peak. `hlo_text`: the optimized module's text, if
    already at hand (with it and the devices given, `compiled` may be None: no XLA figures then).
    `tick_branches`: int [devices, ticks], the branch of its tick loop's switch each device runs per tick (a
    pipeline's plan: dsv3_jax.train.build.TrainStep.tick_branches); without it a tick costs its costliest branch.

        est = estimate(step.compile().compiled)             # the devices it was compiled for
        est.est_step_s, est.exposed_comm_s, est_mfu(model_flops_per_device, est)

    The model, per device and per call of the program (`compiled.as_text()`: in each computation, the
    instruction order is the schedule):
    - Operations run one at a time in schedule order; each takes the longer of its matmul FLOPs at the chip's rate
      for their number format and its HBM bytes at the chip's bandwidth, each rate times the chip's efficiency for
      that kind of work (experiments.hardware; 1 with `roofline`). Elementwise FLOPs are not counted: such work is
      bound by its bytes. Arrays in a TPU's on-chip memory cost no HBM traffic; the asynchronous copies that move
      them in and out (`copy-start`/`slice-start` … `-done`) run on a queue of their own at HBM bandwidth, and a
      `-done` the compute has not covered stalls the clock (counted as compute, of the memory kind).
    - One queue carries every collective, in issue order: a synchronous collective stops the clock until it is
      done; an asynchronous one (`*-start` … `*-done`, or an `async-start` wrapping a collective) starts when issued
      and the queue is free, and its `-done` waits only for what the compute since did not cover.
    - A while loop counts its body times its static trip count; one whose count is only known at run time counts
      once and is listed in `dynamic_loops`, except the expert exchange's rounds past the first (name scope
      sharding.ep_exchange.SKEW_ONLY_SCOPE), which balanced routing never runs: 0 times (listed too). A loop, call or
      conditional is a block on the clock with queues of its own (transfers do not overlap across its boundary); a
      conditional costs its most expensive branch, except in a tick loop given `tick_branches`: a lockstep
      pipeline, where each tick costs the branch of the device that runs the slowest one that tick. Asynchronous
      calls that are not collectives (TPU SparseCore offloads) are priced as compute, in order.
    - Not modelled: per-kernel launch overheads and per-collective latency (only bandwidth), contention between
      the copy queue, the collectives and the compute for HBM, and several collectives sharing a link at once."""
    module = parse_module(hlo_text if hlo_text is not None else compiled.as_text())
    links = links_for(compiled, target, module.num_partitions)
    chip = links.chip.rated(roofline)
    walker = _Walker(module, dataclasses.replace(links, chip=chip), chip,
                     None if tick_branches is None else np.asarray(tick_branches))
    totals = walker.walk(module.entry)
    sent = dict(totals.bytes_sent)
    cost = _xla_cost(compiled)
    optimal = cost.get("optimal_seconds")
    if optimal is not None:
        optimal = float(optimal) + sum(1 for c in module.computations.values() for i in c.instructions
                                       if i.opcode == "custom-call"
                                       and (i.attribute("custom_call_target") or "").strip('"') in XLA_UNPRICED_CALLS)
    return Estimate(
        chip=chip.name, roofline=roofline, compute_s=totals.compute_s, comm_s=totals.comm_s,
        exposed_comm_s=totals.exposed_s, est_step_s=totals.compute_s + totals.exposed_s, flops=totals.flops,
        **{f"bytes_{kind.replace('-', '_')}": float(sent.get(kind, 0.0)) for kind in KINDS},
        xla_optimal_s=None if optimal is None else float(optimal),
        xla_flops=float(cost["flops"]) if "flops" in cost else None,
        compute_by_kind={kind: float(dict(totals.by_kind).get(kind, 0.0)) for kind in WORK_KINDS},
        async_collectives=totals.async_count, sync_collectives=totals.sync_count,
        dynamic_loops=tuple(walker.dynamic_loops), repeated_loops=tuple(walker.repeated_loops),
        unpriced=dict(walker.unpriced), lockstep_ticks=walker.lockstep_ticks,
        bytes_internode={kind: float(sent.get(kind + INTERNODE, 0.0)) for kind in KINDS})


def est_mfu(model_flops_per_device: float, estimate: Estimate, chip: Chip | str | None = None) -> float | None:
    """Model FLOPs per device (what the caller counts: 6 · activated parameters · tokens plus attention) over the
    estimated step time × the chip's BF16 peak (default: the estimate's chip). None where that cannot be right: a
    step time or FLOP count that is not positive and finite, or an MFU above 1."""
    chip = chip_named(estimate.chip) if chip is None else (chip_named(chip) if isinstance(chip, str) else chip)
    seconds = estimate.est_step_s
    if not (math.isfinite(seconds) and seconds > 0 and math.isfinite(model_flops_per_device)
            and model_flops_per_device > 0):
        return None
    mfu = model_flops_per_device / (seconds * chip.bf16_flops)
    return mfu if mfu <= 1 else None
