"""python -m experiments.gpu_check (`make gpu-check`): the dry run prints one bench command per owed GPU number with
arguments the benches accept and a total limit under 10 minutes; a failing or overrunning check is reported and
the others still run, with exit code 1; bad arguments exit 2 with one line."""

import json
import subprocess
import sys

import pytest

from experiments import bench, gpu_check
from tests.fast_compile import ROOT


def test_dry_run_prints_every_owed_command(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu_check", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    commands = [line.split("   # ")[0] for line in lines[:-1]]
    assert len(commands) == 5 and lines[-1].startswith("total limit")
    assert int(lines[-1].split()[2]) < 600
    text = "\n".join(commands)
    for needed in ("bench fp8_gemm", "bench moe", "train_step --config small", "--set model.fp8=true",
                   "decode --config small --batch 1,8,64", f"--out {out}/decode.json"):
        assert needed in text, needed
    assert not out.exists()    # nothing ran


def test_every_check_parses_with_its_benchmark():
    parser = bench._parser({name: bench.load(name) for name in bench.BENCHMARKS})
    for check in gpu_check.CHECKS:
        args = parser.parse_args([*check.bench_args, "--out", "x.json"])
        assert args.name == check.bench_args[0]
    train = [c for c in gpu_check.CHECKS if c.bench_args[0] == "train_step"]
    assert {"model.fp8=true" in c.bench_args for c in train} == {True, False}    # BF16 and FP8, both vs HF


def test_run_check_reports_ok_exit_code_and_timeout(tmp_path):
    log = tmp_path / "log"
    assert gpu_check.run_check([sys.executable, "-c", "print('fine')"], str(log), 60)[0] == "ok"
    assert log.read_text() == "fine\n"
    assert gpu_check.run_check([sys.executable, "-c", "raise SystemExit(3)"], str(log), 60)[0] == "exit 3"
    status, seconds = gpu_check.run_check([sys.executable, "-c", "import time; time.sleep(60)"], str(log), 1)
    assert status == "timeout" and seconds < 30


def test_a_failing_check_does_not_stop_the_others(tmp_path, capsys):
    ran = []

    def fake_run(argv, log_path, limit_s):
        out = argv[argv.index("--out") + 1]
        ran.append(out)
        if "moe" in out:
            return "exit 1", 0.5
        with open(out, "w") as f:
            json.dump({}, f)
        return "ok", 0.5

    code = gpu_check.main(["--out", str(tmp_path), "--only", "moe,decode"], run=fake_run)
    printed = capsys.readouterr().out
    assert code == 1 and len(ran) == 2 and "1/2 ok" in printed
    assert "exit 1" in printed and str(tmp_path / "decode.json") in printed


@pytest.mark.parametrize("argv, named", [(["--only", "fp8_gem"], "--only"), (["--frobnicate"], "--frobnicate")])
def test_bad_arguments_exit_2_with_one_line(argv, named, capsys):
    assert gpu_check.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0]
