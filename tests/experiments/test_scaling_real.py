"""experiments.scaling_real: every rung is a valid `experiments.scaling` study (its arguments resolve to points
without compiling anything), and the joined rows draw both figures, a failed point included."""

import csv

import pytest

from experiments import scaling, scaling_real
from sharding import targets


@pytest.mark.parametrize("name", sorted(scaling_real.RUNGS))
def test_every_rung_resolves_to_points(name, tmp_path):
    args = scaling.build_parser().parse_args([*scaling_real.RUNGS[name], "--out", str(tmp_path)])
    meshes = scaling.parse_meshes(args.meshes)
    target = scaling.check_target(args, meshes)
    _, points = scaling.resolve(args, meshes)
    assert target == args.target and points
    assert all(p.n_devices == targets.device_count(target) for p in points)


def test_joined_rows_draw_memory_against_hbm_and_cost_model_mfu(tmp_path):
    path = tmp_path / "scaling.csv"
    base = dict(target="v5p:8x8x8", preset="v3-671b", mesh="fsdp=8,expert=64", strategy="fsdp", schedule="",
                fp8="False", device_memory_bytes=str(95 * 2**30))
    rows = [dict(base, peak_bytes_per_device=str(80 * 2**30), fits="True", xla_cost_model_mfu="0.41", est_mfu="0.27",
                 est_step_s="9.5"),
            dict(base, mesh="fsdp=64,expert=8", error="JaxRuntimeError: RESOURCE_EXHAUSTED: 120G")]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=scaling.CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    read = scaling_real.read_rows(str(path))
    assert read[0]["peak_bytes_per_device"] == 80 * 2**30 and read[1]["peak_bytes_per_device"] is None
    assert read[0]["xla_cost_model_mfu"] == pytest.approx(0.41) and read[0]["fp8"] is False
    assert read[0]["est_mfu"] == pytest.approx(0.27) and read[1]["est_mfu"] is None
    for png in (scaling_real.plot_memory_vs_hbm(read, str(tmp_path)),
                scaling_real.plot_estimated_mfu(read, str(tmp_path), scaling_real.REFERENCE_MFUS)):
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_unknown_rung_is_one_line_and_exit_2(capsys, tmp_path):
    assert scaling_real.main(["--only", "v9-huge", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only" in err[0] and not any(tmp_path.iterdir())
