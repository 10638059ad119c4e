"""The benchmark programs (python -m experiments.bench): each prints a table and writes JSON whose rows hold the
numbers the benchmark claims. pipeline_bubbles runs in-process; ep_buffers in-process when this process has the
devices, else in a subprocess on 8 simulated CPU devices; sharding_memory in a subprocess on a 2-mesh subset of a
shrunken model (compile only, ~30 s on 2 CPU cores)."""

import json
import os
import subprocess
import sys

import pytest

from experiments.bench import BENCHMARKS, format_table, main, markdown_table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_in_process(argv):
    lines = []
    result = main(argv, print_fn=lines.append)
    return result, "\n".join(lines)


def run_subprocess(argv, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "experiments.bench", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def load(path):
    with open(path) as f:
        return json.load(f)


def test_list_names_every_benchmark_and_its_baseline():
    lines = []
    assert main(["--list"], print_fn=lines.append) is None
    assert [line.split()[0] for line in lines] == list(BENCHMARKS)
    assert all("baseline:" in line for line in lines)


def test_tables_align_and_print_missing_values_as_dash():
    rows = [dict(a=1, b=0.5), dict(a=10, b=None)]
    columns = [("a", "a", "d"), ("half", "b", ".2f"), ("twice", lambda r: 2 * r["a"], "d")]
    lines = format_table(rows, columns).splitlines()
    assert lines[0].split() == ["a", "half", "twice"] and lines[3].split() == ["10", "-", "20"]
    assert len({len(line) for line in lines}) == 1
    assert markdown_table(rows, columns).splitlines()[2] == "| 1 | 0.50 | 2 |"


def test_pipeline_bubbles(tmp_path):
    out = tmp_path / "pipeline_bubbles.json"
    result, printed = run_in_process(["pipeline_bubbles", "--out", str(out)])
    data = load(out)
    assert data["rows"] == json.loads(json.dumps(result["rows"]))
    assert data["benchmark"] == "pipeline_bubbles" and data["command"].startswith("python -m experiments.bench")
    assert data["date"] and data["device"]["description"]
    assert "1f1b" in printed and "dualpipe" in printed
    rows = {(r["pp"], r["micro"], r["schedule"]): r for r in data["rows"]}
    assert set(rows) == {(pp, x * pp, s) for pp in (4, 8) for x in (2, 4) for s in ("gpipe", "1f1b", "dualpipe")}
    for (pp, micro, name), r in rows.items():
        assert "skipped" not in r
        assert r["bubble_max"] == r["bubble_formula"]   # F = B = 1, F&B = F + B: the table's formula is exact
        assert r["makespan"] == micro * 2 + r["bubble_max"]   # busy time M·(F+B) on every device
        if name in ("1f1b", "gpipe"):
            assert r["bubble_max"] == r["bubble_min"] == (pp - 1) * 2
            assert r["param_chunks"] == 1
        else:
            assert r["bubble_max"] == (pp // 2 - 1) * 3
            assert r["bubble_vs_1f1b"] < 1 and r["param_chunks"] == 2
        assert r["bubble_vs_1f1b"] == pytest.approx(r["bubble_max"] / rows[(pp, micro, "1f1b")]["bubble_max"])
    assert rows[(4, 8, "1f1b")]["bubble_vs_1f1b"] == 1.0
    assert rows[(8, 32, "1f1b")]["peak_in_flight"] == 8 and rows[(8, 32, "gpipe")]["peak_in_flight"] == 32


def test_ep_buffers(tmp_path):
    import jax

    out = tmp_path / "ep_buffers.json"
    if jax.device_count() >= 8:
        run_in_process(["ep_buffers", "--out", str(out)])
    else:   # JAX in this process has its devices already; the benchmark asks for 8 before importing JAX
        assert "uniform" in run_subprocess(["ep_buffers", "--out", str(out), "--simulate-devices", "8"])
    data = load(out)
    assert data["baseline"].startswith("balanced")
    rows = {(r["ep"], r["routing"]): r for r in data["rows"]}
    assert set(rows) == {(ep, kind) for ep in (4, 8) for kind in ("uniform", "skew90", "hot_rank")}
    for (ep, kind), r in rows.items():
        balanced = r["tokens_per_rank"] * r["top_k"]
        assert r["balanced_rows"] == balanced
        # The exchange's buffer holds token rows (one per destination rank), sized from the expected distinct
        # ranks per token at the capacity factor: at least a row per token, at most 1.25 × the K rows per token.
        assert r["tokens_per_rank"] <= r["buffer_rows"] <= 1.25 * balanced + ep * 8
        assert r["buffer_rows"] < r["worst_case_rows"]
        assert r["worst_case_rows"] == ep * r["tokens_per_rank"] * min(r["top_k"], r["experts"] // ep)
        assert r["peak_rows"] <= r["buffer_rows"] and r["max_rows_received"] <= r["worst_case_rows"]
        assert r["dropped_rows"] == 0 and r["rows_total"] == ep * balanced   # dropless
        assert r["buffer_vs_balanced"] == pytest.approx(r["buffer_rows"] / balanced)
        if kind == "uniform":
            assert r["rounds"] == 1
        else:   # skew costs rounds (or, deduplicated to a row per token and rank, none), never buffer rows
            assert r["max_rows_received"] > r["buffer_rows"]
    assert rows[(8, "skew90")]["rounds"] > 1 and rows[(8, "hot_rank")]["rounds"] > 1
    assert rows[(8, "hot_rank")]["peak_rows"] == rows[(8, "hot_rank")]["buffer_rows"]
    assert rows[(8, "hot_rank")]["max_rows_received"] == rows[(8, "hot_rank")]["worst_case_rows"]


SMALL_MODEL = ["--set", "n_layers=2", "--set", "num_mtp_modules=0", "--set", "dim=64", "--set", "vocab_size=512",
               "--set", "n_routed_experts=8", "--set", "moe_intermediate_size=32", "--set", "intermediate_size=128",
               "--batch", "8", "--seq-len", "16"]


def test_sharding_memory_two_meshes(tmp_path):
    out = tmp_path / "sharding_memory.json"
    printed = run_subprocess(["sharding_memory", "--out", str(out), "--meshes", "data=8/zero1", "fsdp=4,expert=2/fsdp",
                              *SMALL_MODEL])
    assert "single" in printed and "zero1" in printed
    data = load(out)
    base, (zero1, fsdp) = data["baseline"], data["rows"]
    assert data["device"]["device_count"] == 8 and data["device"]["simulated"]
    assert base["params_bytes"] == data["config"]["n_params"] * 4   # float32 parameters
    assert base["opt_state_bytes"] >= 2 * base["params_bytes"]      # AdamW mu and nu
    for row in (base, zero1, fsdp):
        # The compiled step takes the state (donated: aliased to the new state) and the batch.
        assert row["argument_size_in_bytes"] >= row["state_bytes"]
        assert row["alias_size_in_bytes"] == pytest.approx(row["state_bytes"], rel=0.01)
        assert row["total_bytes"] > row["state_bytes"]
    assert (zero1["mesh"], zero1["strategy"], zero1["devices"]) == ("data=8", "zero1", 8)
    assert zero1["params_bytes"] == base["params_bytes"]              # ZeRO-1: parameters whole
    assert zero1["opt_state_vs_single"] <= 0.13                        # moments split 8 ways
    assert fsdp["params_vs_single"] < 0.3 and fsdp["opt_state_vs_single"] < 0.3
    assert fsdp["state_vs_single"] == pytest.approx(fsdp["state_bytes"] / base["state_bytes"])
