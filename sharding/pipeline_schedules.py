"""Pipeline schedules (GPipe, 1F1B, DualPipe) as explicit per-device programs, and a timeline simulator.
Pure Python: `python -m sharding.pipeline_schedules --pp 4 --micro 8` prints every schedule's timeline and bubble.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import Callable, Iterator

SCHEDULE_NAMES = ("gpipe", "1f1b", "dualpipe")


class ScheduleError(ValueError):
    """A schedule that cannot be built for these sizes, or a program that breaks a dependency."""


@dataclass(frozen=True)
class Action:
    """One unit of work: the forward ("F") or full backward ("B") of `micro` through model stage `stage`."""
    kind: str
    micro: int
    stage: int

    def __str__(self) -> str:
        return f"{self.kind}{self.micro}"


# A slot is what a device does in one go: one action, or (DualPipe) an overlapped pair (forward, backward) of micro-
# batches travelling in opposite directions, whose compute hides the other's communication.
Slot = tuple[Action, ...]


@dataclass(frozen=True)
class Schedule:
    """Per-device programs for `n_devices` stages (stage s of the model is one chunk of work) and `n_micro` micros.

    For each of PP devices, the ordered work it does on M micro-batches: F(micro, stage) forwards and B(micro, stage)
    full backwards (no split weight-gradient unit: W = 0). `tick_table` lays the programs out on unit ticks;
    `simulate` times them under unit costs F, B (and F&B, an overlapped forward/backward pair).
    Unidirectional (GPipe, 1F1B): stage s runs on device s. Bidirectional (DualPipe): micro-batches
    [0, M/2) travel down (stage s on device s), [M/2, M) travel up (stage s on device PP−1−s), so device d holds
    chunk 0 = stage d and chunk 1 = stage PP−1−d: twice the parameters.
    """
    name: str
    n_devices: int
    n_micro: int
    programs: tuple[tuple[Slot, ...], ...]
    bidirectional: bool = False

    @property
    def n_stages(self) -> int:
        return self.n_devices

    @property
    def n_chunks(self) -> int:
        """Parameter chunks per device."""
        return 2 if self.bidirectional else 1

    def chunk_of(self, micro: int) -> int:
        """0 for the down direction, 1 for the up direction."""
        return int(self.bidirectional and micro >= self.n_micro // 2)

    def device_of(self, micro: int, stage: int) -> int:
        return self.n_devices - 1 - stage if self.chunk_of(micro) else stage


def dependencies(action: Action, n_stages: int) -> list[Action]:
    """F(m, s) after F(m, s−1); B(m, s) after F(m, s) and B(m, s+1)."""
    if action.kind == "F":
        return [Action("F", action.micro, action.stage - 1)] if action.stage > 0 else []
    deps = [Action("F", action.micro, action.stage)]
    if action.stage < n_stages - 1:
        deps.append(Action("B", action.micro, action.stage + 1))
    return deps


def gpipe(n_devices: int, n_micro: int) -> Schedule:
    """Every forward, then every backward."""
    _check_sizes("gpipe", n_devices, n_micro)
    programs = tuple(tuple((Action(kind, m, d),) for kind in "FB" for m in range(n_micro))
                     for d in range(n_devices))
    return Schedule("gpipe", n_devices, n_micro, programs)


def one_f_one_b(n_devices: int, n_micro: int) -> Schedule:
    """PP−1−d warm-up forwards on device d, then alternate one forward and one backward, then the cool-down."""
    _check_sizes("1f1b", n_devices, n_micro)
    programs = []
    for d in range(n_devices):
        warmup = min(n_devices - 1 - d, n_micro)
        program = [(Action("F", m, d),) for m in range(warmup)]
        for m in range(n_micro - warmup):
            program += [(Action("F", warmup + m, d),), (Action("B", m, d),)]
        program += [(Action("B", m, d),) for m in range(n_micro - warmup, n_micro)]
        programs.append(tuple(program))
    return Schedule("1f1b", n_devices, n_micro, tuple(programs))


def dualpipe(n_devices: int, n_micro: int) -> Schedule:
    """Bidirectional: half the micro-batches enter at device 0, half at device PP−1.

    Device d with h = min(d, PP−1−d) is stage h of its "near" direction (the one entering on its side) and stage
    PP−1−h of the "far" one. With n = PP/2 and K = M/2, its program is (FN = near forward, BF = far backward, ...):
      1. 2(n−1−h) × FN                         warm-up on the near direction
      2. h+1      × FN, FF                     the far direction arrives
      3. n−1−h    × BF, FF                     the first far backwards come back
      4. K−2n+1+h × (FN & BF), (FF & BN)       steady state: every slot an overlapped pair
      5. n−1−h    × BF, (FF & BN)              near forwards are done
      6. h+1      × BF, BN
      7. n−1−h    × BN                         cool-down
    """
    if n_devices < 2 or n_devices % 2:
        raise ScheduleError(f"dualpipe: needs an even number of pipeline stages ≥ 2, got PP={n_devices}")
    if n_micro < 2 * n_devices or n_micro % 2:
        raise ScheduleError(f"dualpipe: needs an even number of micro-batches ≥ 2·PP = {2 * n_devices}, "
                            f"got {n_micro}")
    n, half = n_devices // 2, n_micro // 2
    programs = []
    for d in range(n_devices):
        h = min(d, n_devices - 1 - d)
        down, up = range(half), range(half, n_micro)
        near, far = (down, up) if d < n else (up, down)
        fn, ff = _actions("F", near, h), _actions("F", far, n_devices - 1 - h)
        bn, bf = _actions("B", near, h), _actions("B", far, n_devices - 1 - h)
        program: list[Slot] = [(next(fn),) for _ in range(2 * (n - 1 - h))]
        for _ in range(h + 1):
            program += [(next(fn),), (next(ff),)]
        for _ in range(n - 1 - h):
            program += [(next(bf),), (next(ff),)]
        for _ in range(half - 2 * n + 1 + h):
            program += [(next(fn), next(bf)), (next(ff), next(bn))]
        for _ in range(n - 1 - h):
            program += [(next(bf),), (next(ff), next(bn))]
        for _ in range(h + 1):
            program += [(next(bf),), (next(bn),)]
        program += [(next(bn),) for _ in range(n - 1 - h)]
        programs.append(tuple(program))
    return Schedule("dualpipe", n_devices, n_micro, tuple(programs), bidirectional=True)


SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {"gpipe": gpipe, "1f1b": one_f_one_b, "dualpipe": dualpipe}


@functools.lru_cache(maxsize=64)
def make_schedule(name: str, n_devices: int, n_micro: int) -> Schedule:
    """The schedule called `name` (one of SCHEDULE_NAMES), checked complete; built once per (name, sizes) and
    shared (a Schedule is immutable), so a run's validation and its step use the same object."""
    if name not in SCHEDULES:
        raise ScheduleError(f"schedule {name!r}: not one of {', '.join(SCHEDULE_NAMES)}")
    schedule = SCHEDULES[name](n_devices, n_micro)
    check_complete(schedule)
    return schedule


def check_complete(schedule: Schedule) -> None:
    """Every (micro, stage) forward and backward exactly once, on the device that holds that stage for that micro."""
    seen: dict[Action, int] = {}
    for device, program in enumerate(schedule.programs):
        for action in (a for slot in program for a in slot):
            if action in seen:
                raise ScheduleError(f"{schedule.name}: {action.kind}({action.micro}, {action.stage}) runs twice")
            if schedule.device_of(action.micro, action.stage) != device:
                raise ScheduleError(f"{schedule.name}: {action.kind}({action.micro}, {action.stage}) runs on device "
                                    f"{device}, not {schedule.device_of(action.micro, action.stage)}")
            seen[action] = device
    expected = schedule.n_micro * schedule.n_stages * 2
    if len(seen) != expected:
        raise ScheduleError(f"{schedule.name}: {len(seen)} of the {expected} actions are scheduled")


@dataclass(frozen=True)
class Costs:
    """Unit costs: a forward, a full backward, and an overlapped forward&backward pair (default f + b)."""
    f: float = 1
    b: float = 1
    fb: float | None = None

    def of(self, slot: Slot) -> float:
        if len(slot) == 2:
            return self.f + self.b if self.fb is None else self.fb
        return self.f if slot[0].kind == "F" else self.b


@dataclass(frozen=True)
class Timeline:
    """Start and end time of every slot, per device, and the idle time (bubble) of each device."""
    schedule: Schedule
    costs: Costs
    spans: tuple[tuple[tuple[float, float, Slot], ...], ...]

    @property
    def makespan(self) -> float:
        return max(end for spans in self.spans for _, end, _ in spans)

    @property
    def bubbles(self) -> tuple[float, ...]:
        """makespan − busy time, per device (busy counts an overlapped pair once, at cost F&B)."""
        return tuple(self.makespan - sum(end - start for start, end, _ in spans) for spans in self.spans)


def simulate(schedule: Schedule, costs: Costs = Costs()) -> Timeline:
    """Times the programs: each slot starts as soon as its device is free and its dependencies have ended.

    Cost model: communication is free; a slot costs F, B, or F&B (overlapped pair); all of a pair's outputs are
    ready when the pair ends, and all of its inputs must be ready when it starts. With this model
      GPipe, 1F1B: bubble = (PP−1)(F+B) on every device;
      DualPipe:    bubble = (PP/2−1)(F&B+B) on every device when F&B = F+B, i.e. (PP/2−1)(F+2B); when F&B < F+B
                   the middle devices have exactly that and the outer ones less.
    These are the DeepSeek-V3 report's bubble formulas with W = 0 (the backward is not split). A program that waits
    on work that can never come raises ScheduleError.
    """
    ends: dict[Action, float] = {}
    free = [0.0] * schedule.n_devices
    position = [0] * schedule.n_devices
    spans: list[list[tuple[float, float, Slot]]] = [[] for _ in range(schedule.n_devices)]
    remaining = sum(len(p) for p in schedule.programs)
    while remaining:
        progressed = False
        for device, program in enumerate(schedule.programs):
            while position[device] < len(program):
                slot = program[position[device]]
                deps = [dep for action in slot for dep in dependencies(action, schedule.n_stages)]
                if not all(dep in ends for dep in deps):
                    break
                start = max([free[device]] + [ends[dep] for dep in deps])
                end = start + costs.of(slot)
                for action in slot:
                    ends[action] = end
                spans[device].append((start, end, slot))
                free[device], position[device] = end, position[device] + 1
                remaining, progressed = remaining - 1, True
        if remaining and not progressed:
            stuck = ", ".join(f"device {d} at {program[position[d]][0]}"
                              for d, program in enumerate(schedule.programs) if position[d] < len(program))
            raise ScheduleError(f"{schedule.name}: deadlock, waiting: {stuck}")
    return Timeline(schedule, costs, tuple(tuple(s) for s in spans))


def tick_table(schedule: Schedule) -> tuple[tuple[Slot, ...], ...]:
    """What each device does at each unit tick: one slot of its program (a forward, a backward, an overlapped forward
    and backward pair run together as one program, or () idle), every slot one tick long (F = B = F&B = 1).

    Every action comes at a later tick than all of its dependencies, so devices can run it in lockstep, exchanging
    activations and cotangents with their neighbours between ticks.
    """
    timeline = simulate(schedule, Costs(f=1, b=1, fb=1))
    n_ticks = int(timeline.makespan)
    table: list[list[Slot]] = [[()] * n_ticks for _ in range(schedule.n_devices)]
    for device, spans in enumerate(timeline.spans):
        for start, _, slot in spans:
            table[device][int(start)] = slot
    return tuple(tuple(row) for row in table)


def format_timeline(timeline: Timeline) -> str:
    """One row per device, one cell per time unit (`F3`, `B3`, `.` idle); costs must be whole numbers."""
    schedule, costs = timeline.schedule, timeline.costs
    width = 1 + len(str(schedule.n_micro - 1))
    rows = []
    for device, spans in enumerate(timeline.spans):
        cells = ["."] * int(timeline.makespan)
        for start, end, slot in spans:
            labels = [str(slot[0])] * int(end - start)
            if len(slot) == 2:   # the pair's cells split between its forward and backward in proportion f : b
                n_forward = max(1, round((end - start) * costs.f / (costs.f + costs.b)))
                labels = [str(slot[0])] * n_forward + [str(slot[1])] * (int(end - start) - n_forward)
            cells[int(start):int(end)] = labels
        rows.append(f"device {device}: " + " ".join(cell.ljust(width) for cell in cells))
    return "\n".join(rows)


def bubble_formula(schedule: Schedule, costs: Costs) -> float:
    """The bubble the DeepSeek-V3 report's formulas give for this schedule with W = 0 (see `simulate`)."""
    fb = costs.f + costs.b if costs.fb is None else costs.fb
    if schedule.bidirectional:
        return (schedule.n_devices // 2 - 1) * (fb + costs.b)
    return (schedule.n_devices - 1) * (costs.f + costs.b)


def _actions(kind: str, micros: range, stage: int) -> Iterator[Action]:
    return (Action(kind, m, stage) for m in micros)


def _check_sizes(name: str, n_devices: int, n_micro: int) -> None:
    if n_devices < 1 or n_micro < 1:
        raise ScheduleError(f"{name}: needs ≥ 1 stage and ≥ 1 micro-batch, got PP={n_devices}, M={n_micro}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=4, help="pipeline stages (devices)")
    parser.add_argument("--micro", type=int, default=8, help="micro-batches")
    parser.add_argument("--f", type=int, default=1, help="cost of a forward")
    parser.add_argument("--b", type=int, default=1, help="cost of a full backward")
    parser.add_argument("--fb", type=int, default=None, help="cost of an overlapped F&B pair (default f + b)")
    parser.add_argument("--schedules", default=",".join(SCHEDULE_NAMES))
    args = parser.parse_args(argv)
    costs = Costs(args.f, args.b, args.fb)
    for name in args.schedules.split(","):
        try:
            schedule = make_schedule(name, args.pp, args.micro)
        except ScheduleError as error:
            print(f"{name}: skipped: {error}\n")
            continue
        timeline = simulate(schedule, costs)
        bubbles = ", ".join(f"{b:g}" for b in timeline.bubbles)
        print(f"{name}  PP={args.pp} M={args.micro} F={costs.f} B={costs.b}"
              + (f" F&B={costs.fb}" if schedule.bidirectional and costs.fb is not None else "")
              + f"  makespan {timeline.makespan:g}  bubble per device [{bubbles}]"
              f"  (table: {bubble_formula(schedule, costs):g})")
        print(format_timeline(timeline), end="\n\n")


if __name__ == "__main__":
    main()
