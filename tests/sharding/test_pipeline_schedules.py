"""Pipeline schedules: complete tables, dependencies kept, and bubbles equal to the deepseek_v3.md table."""

import pytest

from sharding.pipeline_schedules import (Action, Costs, Schedule, ScheduleError, bubble_formula, check_complete,
                                         dependencies, format_timeline, main, make_schedule, simulate, tick_table)

SIZES = [(pp, m) for pp in (2, 4, 8) for m in (2 * pp, 2 * pp + 2, 3 * pp)]


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "dualpipe"])
@pytest.mark.parametrize("pp, m", SIZES)
def test_every_action_once_on_its_device_and_after_its_dependencies(name, pp, m):
    schedule = make_schedule(name, pp, m)
    table = tick_table(schedule)
    when = {}
    for device, row in enumerate(table):
        for tick, slot in enumerate(row):
            assert len(slot) <= 2 and len({a.kind for a in slot}) == len(slot), slot   # at most one F and one B
            for action in slot:
                assert action not in when, action
                when[action] = (device, tick)
    assert set(when) == {Action(kind, micro, stage) for kind in "FB" for micro in range(m) for stage in range(pp)}
    for action, (device, tick) in when.items():
        up = action.micro >= m // 2 and name == "dualpipe"
        assert device == (pp - 1 - action.stage if up else action.stage)
        assert all(when[dep][1] < tick for dep in dependencies(action, pp)), action


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "dualpipe"])
@pytest.mark.parametrize("pp, m", SIZES)
def test_unit_cost_bubble_is_the_table_formula_on_every_device(name, pp, m):
    timeline = simulate(make_schedule(name, pp, m), Costs(f=1, b=1))
    expected = (pp // 2 - 1) * 3 if name == "dualpipe" else (pp - 1) * 2   # (PP/2−1)(F+2B), (PP−1)(F+B)
    assert timeline.bubbles == (expected,) * pp
    assert timeline.makespan == 2 * m + expected


@pytest.mark.parametrize("costs", [Costs(f=1, b=2), Costs(f=2, b=3), Costs(f=1, b=2, fb=2), Costs(f=2, b=3, fb=4)])
@pytest.mark.parametrize("pp", [4, 8])
def test_bubble_with_unequal_costs(costs, pp):
    for name in ("gpipe", "1f1b"):
        timeline = simulate(make_schedule(name, pp, 2 * pp), costs)
        assert timeline.bubbles == ((pp - 1) * (costs.f + costs.b),) * pp
    timeline = simulate(make_schedule("dualpipe", pp, 2 * pp + 4), costs)
    formula = bubble_formula(timeline.schedule, costs)
    assert max(timeline.bubbles) == formula == (pp // 2 - 1) * ((costs.fb or costs.f + costs.b) + costs.b)
    if costs.fb is None:
        assert timeline.bubbles == (formula,) * pp   # an overlapped pair costs what its two halves cost


def test_dualpipe_holds_two_mirrored_chunks_per_device_and_overlaps_pairs():
    schedule = make_schedule("dualpipe", 4, 8)
    for device, program in enumerate(schedule.programs):
        stages = {(a.micro < 4, a.stage) for slot in program for a in slot}
        assert stages == {(True, device), (False, 3 - device)}
        pairs = [slot for slot in program if len(slot) == 2]
        assert pairs and all(f.kind == "F" and b.kind == "B" for f, b in pairs)
        assert all(schedule.chunk_of(f.micro) != schedule.chunk_of(b.micro) for f, b in pairs)


@pytest.mark.parametrize("pp, m", [(4, 6), (4, 9), (3, 12), (8, 14)])
def test_dualpipe_rejects_sizes_that_do_not_fit(pp, m):
    with pytest.raises(ScheduleError, match="^dualpipe: needs an even number") as error:
        make_schedule("dualpipe", pp, m)
    assert "\n" not in str(error.value)


def test_check_complete_and_simulate_catch_broken_programs():
    good = make_schedule("1f1b", 2, 2)
    missing = Schedule("x", 2, 2, (good.programs[0][:-1], good.programs[1]))
    with pytest.raises(ScheduleError, match="3 of the 8 actions|7 of the 8 actions"):
        check_complete(missing)
    swapped = Schedule("x", 2, 2, (good.programs[1], good.programs[0]))
    with pytest.raises(ScheduleError, match="runs on device"):
        check_complete(swapped)
    backward_first = Schedule("x", 2, 2, (good.programs[0], tuple(reversed(good.programs[1]))))
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(backward_first)
    with pytest.raises(ScheduleError, match="not one of"):
        make_schedule("zb1p", 2, 2)


def test_timeline_text():
    assert format_timeline(simulate(make_schedule("gpipe", 2, 2))) == (
        "device 0: F0 F1 .  .  B0 B1\n"
        "device 1: .  F0 F1 B0 B1 . ")


def test_cli_prints_every_schedule_with_its_bubble(capsys):
    main(["--pp", "4", "--micro", "8"])
    out = capsys.readouterr().out
    assert "gpipe  PP=4 M=8 F=1 B=1  makespan 22  bubble per device [6, 6, 6, 6]  (table: 6)" in out
    assert "1f1b  PP=4 M=8 F=1 B=1  makespan 22  bubble per device [6, 6, 6, 6]  (table: 6)" in out
    assert "dualpipe  PP=4 M=8 F=1 B=1  makespan 19  bubble per device [3, 3, 3, 3]  (table: 3)" in out
    assert out.count("device 3:") == 3
