"""The train step compiled for chips this machine lacks (sharding.targets): 8 H100s and 4-chip TPU v5p / v6e slices,
over single-chip, fsdp, data×expert and pipeline×expert (1f1b, dualpipe) meshes, in bf16 and FP8, with
model.kernels=auto (the kernels the chips run); and the generate path's prefill and decode step for one H100 and one
v5e chip; and the `tiny` preset (what `make pretrain` trains) on one H100 and one v5e chip. Every point must compile,
run the target's kernels and fit its chip's memory.

The model is the `small` preset's width with 1 dense + 2 MoE layers (and its MTP module), a 4096-token vocabulary
and 128-token sequences. The default run compiles DEFAULT, one point per mesh kind spread over the targets (a few
minutes on 2 cores); `pytest -m aot_full tests/aot` (`make aot`) compiles the whole matrix.
"""

from __future__ import annotations

import pytest

from dsv3_jax.config.presets import get_preset
from dsv3_jax.infer.aot import compile_generate
from dsv3_jax.train.build import build_step
from dsv3_jax.train.run_config import compile_run
from experiments.presets import get_run_preset
from sharding import targets
from sharding.targets import platform_of
from sharding.mesh import build_mesh

MODEL = ("n_layers=3", "first_k_dense_replace=1", "vocab_size=4096")
BATCH, SEQ_LEN, PIPELINE_MICRO = 8, 128, 4
HBM_BYTES = {"h100": 80 * 2**30, "v5p": 95 * 2**30, "v6e": 32 * 2**30, "v5e": 16 * 2**30}
# The custom call every compiled step must hold: the target's own kernels, not the jnp references.
KERNEL_CALL = {"hopper": "mosaic_gpu", "tpu": "tpu_custom_call"}

# mesh kind -> (axes on 8 H100s, axes on 4 TPU chips, parameter strategy, pipeline schedule)
MESHES = {
    "single": ({"data": 1}, {"data": 1}, "zero1", None),
    "fsdp": ({"fsdp": 8}, {"fsdp": 4}, "fsdp", None),
    "data_expert": ({"data": 2, "expert": 4}, {"data": 2, "expert": 2}, "zero1", None),
    "pipeline_expert_1f1b": ({"pipeline": 2, "expert": 4}, {"pipeline": 2, "expert": 2}, "zero1", "1f1b"),
    "pipeline_expert_dualpipe": ({"pipeline": 2, "expert": 4}, {"pipeline": 2, "expert": 2}, "zero1", "dualpipe"),
}
TARGETS = ("h100x8", "v5p:2x2x1", "v6e:2x2")
DTYPES = ("bf16", "fp8")
POINTS = [(t, m, d) for t in TARGETS for m in MESHES for d in DTYPES]
# The default run (`make test`) compiles one point: the suite must stay under 20 minutes on 2 cores, and measured
# there the others cost 160-290 s each (h100x8 pipeline fp8 163 s, v5p fsdp fp8 178 s, v6e single 220 s, TPU
# pipeline points ~290 s) against 60 s for this one. The TPU train step with its Pallas kernels on sharded meshes
# is compiled in the default run by tests/experiments/test_scaling.py (tiny, v5p data=4 and fsdp=4).
DEFAULT = {("h100x8", "data_expert", "bf16")}


def point_id(point) -> str:
    target, mesh, dtype = point
    return f"{target.replace(':', '_')}-{mesh}-{dtype}"


def model_config(dtype: str):
    overrides = (*MODEL, "fp8=true") if dtype == "fp8" else MODEL
    return get_preset("small").with_overrides(*overrides).validate()


def mesh_for(target: str, mesh: str):
    gpu_axes, tpu_axes, _, _ = MESHES[mesh]
    axes = gpu_axes if targets.target_platform(target) == "hopper" else tpu_axes
    n = 1
    for size in axes.values():
        n *= size
    return build_mesh(axes, targets.devices(target)[:n])


def chip(target: str) -> str:
    return target.split(":")[0].split("x")[0]


def compile_point(target: str, mesh_kind: str, dtype: str):
    _, _, strategy, schedule = MESHES[mesh_kind]
    micro = PIPELINE_MICRO if schedule else 1
    run = compile_run(model_config(dtype), batch=BATCH, seq_len=SEQ_LEN, micro=micro, strategy=strategy,
                      schedule=schedule or "1f1b")
    return build_step(run, mesh_for(target, mesh_kind)).compile()


def check_compiled(result, target: str):
    assert 0 < result.peak_bytes < HBM_BYTES[chip(target)], (result.memory, target)
    call = KERNEL_CALL[platform_of(targets.devices(target)[0])]
    assert call in result.compiled.as_text(), f"no {call} in the step"


def _params(points):
    return [pytest.param(*p, id=point_id(p), marks=() if p in DEFAULT else pytest.mark.aot_full) for p in points]


@pytest.mark.parametrize("target,mesh_kind,dtype", _params(POINTS))
def test_train_step_compiles(target, mesh_kind, dtype):
    result = compile_point(target, mesh_kind, dtype)
    check_compiled(result, target)
    if MESHES[mesh_kind][0].get("expert", 1) > 1 and targets.target_platform(target) == "hopper":
        assert "all-to-all" in result.compiled.as_text()   # tokens travel to their experts' ranks


def test_the_full_matrix_covers_every_mesh_target_and_dtype():
    assert DEFAULT <= set(POINTS) and len(POINTS) == len(TARGETS) * len(MESHES) * len(DTYPES)
    assert {m for _, m, _ in POINTS} == set(MESHES) and {t for t, _, _ in POINTS} == set(TARGETS)


@pytest.mark.parametrize("target", ["h100", "v5e:1"])
def test_tiny_pretrain_step_compiles_for_one_chip(target):
    """`make pretrain`'s preset and run (8 × 128 tokens, float32, model.kernels=auto) for one chip of each kind; on
    the H100 it needs the project's GPU compiler options (XLA's Triton GEMMs find no tile for its 32-wide matmuls)."""
    run = get_run_preset("tiny")
    step = build_step(run, build_mesh({"data": 1}, targets.devices(target)))
    assert step.kernels.target == platform_of(targets.devices(target)[0])
    result = step.compile()
    assert 0 < result.peak_bytes < HBM_BYTES[chip(target)], (result.memory, target)


@pytest.mark.parametrize("target", ["h100", "v5e:1"])
def test_generate_compiles(target):   # on one chip (a single-chip v5e topology is not describable: one of a 2x2 host)
    prefill, decode = compile_generate(model_config("bf16"), targets.devices(target)[0], batch=4, prompt_len=64,
                                       cache_len=128)
    for result in (prefill, decode):
        assert 0 < result.peak_bytes < HBM_BYTES[chip(target)], (result.memory, target)
