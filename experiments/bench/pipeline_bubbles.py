"""Pipeline bubbles: idle time per device of GPipe, 1F1B and DualPipe, simulated under unit costs (communication free)
by sharding.pipeline_schedules. Baseline: 1F1B.
"""

from __future__ import annotations

from experiments.bench import format_table

NAME = "pipeline_bubbles"
SUMMARY = "bubble ticks of gpipe / 1f1b / dualpipe at PP=4, 8 (simulated, unit costs)"
BASELINE = "1f1b at the same PP and M"
DEVICES = 0


def add_arguments(parser) -> None:
    parser.add_argument("--pp", type=int, nargs="+", default=[4, 8], help="pipeline stages (default: %(default)s)")
    parser.add_argument("--micro-per-stage", type=int, nargs="+", default=[2, 4], metavar="X",
                        help="micro-batches M = X·PP (default: %(default)s)")
    parser.add_argument("--f", type=float, default=1, help="cost of a forward (default: %(default)s)")
    parser.add_argument("--b", type=float, default=1, help="cost of a full backward (default: %(default)s)")
    parser.add_argument("--fb", type=float, default=None, help="cost of an overlapped F&B pair (default: F+B)")


def peak_in_flight(program) -> int:
    """Most micro-batches whose forward a device has run and whose backward it has not, over its program."""
    live = peak = 0
    for slot in program:
        for action in slot:   # a pair counts its forward first: the stash holds both for a moment
            live += 1 if action.kind == "F" else -1
            peak = max(peak, live)
    return peak


def measure(pp: int, micro: int, costs) -> list[dict]:
    """For this PP and number of micro-batches M, every schedule of sharding.pipeline_schedules built, checked
    complete and timed by its `simulate` (communication free; F, B, and an overlapped F&B pair as given). Per
    schedule: makespan, the bubble (makespan − busy time) per device, the table's formula (`bubble_formula`), the
    bubble as a fraction of the makespan, the parameter chunks per device, and the peak number of micro-batches
    whose stage activations a device holds (forwards done minus backwards done, from the program order)."""
    from sharding.pipeline_schedules import SCHEDULE_NAMES, ScheduleError, bubble_formula, make_schedule, simulate

    rows = []
    for name in SCHEDULE_NAMES:
        row = dict(pp=pp, micro=micro, schedule=name)
        try:
            schedule = make_schedule(name, pp, micro)
        except ScheduleError as error:
            rows.append(dict(row, skipped=str(error)))
            continue
        timeline = simulate(schedule, costs)
        bubbles = timeline.bubbles
        row.update(makespan=timeline.makespan, bubble_max=max(bubbles), bubble_min=min(bubbles),
                   bubble_mean=sum(bubbles) / len(bubbles), bubble_per_device=list(bubbles),
                   bubble_formula=bubble_formula(schedule, costs),
                   bubble_fraction=max(bubbles) / timeline.makespan, param_chunks=schedule.n_chunks,
                   peak_in_flight=max(peak_in_flight(p) for p in schedule.programs))
        rows.append(row)
    base = next((r for r in rows if r["schedule"] == "1f1b" and "skipped" not in r), None)
    for row in rows:
        if base is not None and "skipped" not in row:
            row["bubble_vs_1f1b"] = row["bubble_max"] / base["bubble_max"] if base["bubble_max"] else None
            row["makespan_vs_1f1b"] = row["makespan"] / base["makespan"]
    return rows


def run(args) -> dict:
    from sharding.pipeline_schedules import Costs

    costs = Costs(args.f, args.b, args.fb)
    rows = [row for pp in args.pp for x in args.micro_per_stage for row in measure(pp, x * pp, costs)]
    return {"config": dict(f=costs.f, b=costs.b, fb=costs.fb, pp=list(args.pp),
                           micro_per_stage=list(args.micro_per_stage)),
            "baseline": BASELINE, "rows": rows}


COLUMNS = [("PP", "pp", "d"), ("M", "micro", "d"), ("schedule", "schedule", "s"), ("makespan", "makespan", "g"),
           ("bubble max", "bubble_max", "g"), ("bubble min", "bubble_min", "g"),
           ("formula", "bubble_formula", "g"), ("bubble/makespan", "bubble_fraction", ".3f"),
           ("vs 1F1B", "bubble_vs_1f1b", ".2f"), ("makespan vs 1F1B", "makespan_vs_1f1b", ".3f"),
           ("param chunks", "param_chunks", "d"), ("peak in flight", "peak_in_flight", "d")]


def table(result: dict) -> str:
    c = result["config"]
    fb = "F+B" if c["fb"] is None else f"{c['fb']:g}"
    rows = [r for r in result["rows"] if "skipped" not in r]
    text = [f"costs F={c['f']:g} B={c['b']:g} F&B={fb}; bubble = makespan − busy time per device; "
            f"baseline: {result['baseline']}", format_table(rows, COLUMNS)]
    text += [f"skipped {r['schedule']} PP={r['pp']} M={r['micro']}: {r['skipped']}"
             for r in result["rows"] if "skipped" in r]
    return "\n".join(text)
