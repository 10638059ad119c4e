"""experiments.estimate on programs whose answer is known, compiled for chips this machine lacks (sharding.targets):
overlap of an all-gather with a matmul (asynchronous on 8 H100s, synchronous on a v5p slice), loops counted per
iteration, the measured H100 GEMM rate, XLA's TPU cost model as a yardstick, replica groups and the links they
cross, and the MFU guard."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from experiments.collectives import Links, parse_pairs, parse_replica_groups, price_groups, price_pairs
from experiments.estimate import est_mfu, estimate
from experiments.hardware import CHIPS, H100, H800
from experiments.hlo_module import parse_module
from sharding import targets

GB = 1e9
MIB = 2**20
H100_GEMM = 715e12              # the measured dense BF16 rate the H100 entry carries
NVLINK, IB = 450 * GB, 50 * GB  # one direction, per GPU


def mesh_of(target: str, shape=None, names=("x",)) -> Mesh:
    devices = np.array(targets.devices(target))
    return Mesh(devices.reshape(shape or devices.shape), names)


def compiled(fn, mesh: Mesh, *specs_and_shapes, dtype=jnp.bfloat16, **options):
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec)) for spec, shape in specs_and_shapes]
    return jax.jit(fn).lower(*args).compile(compiler_options=options or None)


def opcodes(c) -> list[str]:
    return [i.opcode for i in parse_module(c.as_text()).entry_computation.instructions]


def gather_then(mesh: Mesh, use_gathered: bool):
    """Each device's [1024, 4096] shard of a [8192, 4096] array all-gathered; beside it (or on the gathered array)
    a matmul of 2·8192·4096·1024 FLOPs."""
    def independent(shard, a, b):
        return jax.lax.all_gather(shard, "x", tiled=True), a @ b

    def dependent(shard, a, b):
        return jax.lax.all_gather(shard, "x", tiled=True) @ b, a

    body = dependent if use_gathered else independent
    fn = jax.shard_map(body, mesh=mesh, in_specs=(P("x"), P(), P()), out_specs=(P(), P()), check_vma=False)
    return compiled(fn, mesh, (P("x"), (8192, 4096)), (P(), (2048, 4096) if not use_gathered else (8, 8)),
                    (P(), (4096, 4096) if not use_gathered else (4096, 1024)))


MATMUL_S = 2 * 8192 * 4096 * 1024 / H100_GEMM        # both programs' matmul on an H100
GATHER_BYTES = 7 / 8 * 8192 * 4096 * 2                # what each of 8 devices sends in the ring


def test_independent_all_gather_costs_the_larger_of_the_two():
    c = gather_then(mesh_of("h100x8"), use_gathered=False)
    ops = opcodes(c)
    assert ops.index("all-gather-start") < ops.index("fusion") < ops.index("all-gather-done")   # overlapped
    e = estimate(c)
    assert e.comm_s == pytest.approx(GATHER_BYTES / NVLINK, rel=1e-6)
    assert e.compute_s == pytest.approx(MATMUL_S, rel=0.02)
    assert e.comm_s > e.compute_s > 0.5 * e.comm_s              # comparable terms, so max and sum differ
    assert e.est_step_s == pytest.approx(max(e.compute_s, e.comm_s), rel=0.01)
    assert e.exposed_comm_s == pytest.approx(e.comm_s - e.compute_s, rel=0.02)
    assert (e.async_collectives, e.sync_collectives) == (1, 0)
    assert e.bytes_all_gather == GATHER_BYTES


def test_dependent_all_gather_costs_the_sum():
    c = gather_then(mesh_of("h100x8"), use_gathered=True)
    e = estimate(c)
    assert "all-gather-start" in opcodes(c)
    assert e.exposed_comm_s == pytest.approx(e.comm_s, rel=1e-6)
    assert e.est_step_s == pytest.approx(MATMUL_S + GATHER_BYTES / NVLINK, rel=0.02)


def test_synchronous_all_gather_is_exposed_whole_on_tpu():
    c = gather_then(mesh_of("v5p:2x2x1"), use_gathered=False)
    ops = opcodes(c)
    assert "all-gather" in ops and "all-gather-start" not in ops   # XLA:TPU keeps this one synchronous
    e = estimate(c)
    ring = CHIPS["v5p"].scale_up_bytes_per_s
    assert e.comm_s == pytest.approx(3 / 4 * 8192 * 4096 * 2 / ring, rel=1e-6)
    assert e.exposed_comm_s == pytest.approx(e.comm_s)
    assert e.est_step_s == pytest.approx(e.compute_s + e.comm_s)
    assert e.sync_collectives == 1


def _loop_program(target: str, iterations: int):
    def looped(x, w):
        return jax.lax.fori_loop(0, iterations, lambda i, y: jnp.tanh(y @ w), x)

    return compiled(looped, mesh_of(target), (P(), (2048, 2048)), (P(), (2048, 2048)))


@pytest.mark.parametrize("target", ["h100", "v5p:1"])   # GPU: XLA's known trip count; TPU: read off the loop
def test_a_loop_costs_its_trip_count_times_one_iteration(target):
    once = estimate(_loop_program(target, 1))              # no loop left: the body's work alone
    loops = {n: _loop_program(target, n) for n in (2, 3, 6)}
    assert all("while" in opcodes(c) for c in loops.values())
    est = {n: estimate(c) for n, c in loops.items()}
    for n, e in est.items():
        assert e.flops == n * 2 * 2048**3 and e.dynamic_loops == ()
        assert len(e.repeated_loops) == 1 and e.repeated_loops[0].endswith(f"x{n}")   # XLA's sum counts it once
    per_iteration = est[3].compute_s - est[2].compute_s
    assert est[6].compute_s - est[3].compute_s == pytest.approx(3 * per_iteration, rel=1e-6)
    # One iteration is the body's matmul and tanh, plus at most a copy of the carried [2048, 2048] array.
    assert once.compute_s <= per_iteration * (1 + 1e-9) <= 1.3 * once.compute_s


def test_a_dynamic_loop_counts_once_and_is_reported():
    mesh = mesh_of("h100")

    def until(x, w, limit):
        return jax.lax.while_loop(lambda c: c[1] < limit[0, 0], lambda c: (c[0] @ w, c[1] + 1.0), (x, 0.0))[0]

    c = compiled(until, mesh, (P(), (2048, 2048)), (P(), (2048, 2048)), (P(), (1, 1)), dtype=jnp.float32)
    e = estimate(c)
    assert len(e.dynamic_loops) == 1 and e.dynamic_loops[0].startswith("while")
    assert e.flops == 2 * 2048**3 and e.repeated_loops == ()


def _tick_program(table):
    """A scan over ticks whose switch runs, per tick, idle (0), one matmul (1) or four (2), as a pipeline's tick loop
    runs the branch its plan row names; the compiled program's branch depends on the device's row of `table`."""
    rows = jnp.asarray(table, jnp.int32)

    def ticks(x, w):
        def tick(y, branch):
            y = jax.lax.switch(branch, [lambda y: y, lambda y: jnp.tanh(y @ w),
                                        lambda y: jnp.tanh(y @ w @ w @ w @ w)], y)
            return y, None
        return jax.lax.scan(tick, x, rows[0])[0]

    return compiled(ticks, mesh_of("h100"), (P(), (2048, 2048)), (P(), (2048, 2048)))


def test_a_tick_loop_costs_each_tick_its_slowest_device_branch():
    matmul = 2 * 2048**3
    table = np.array([[1, 2, 0, 1, 1, 0], [0, 1, 1, 1, 2, 0]])   # two devices' plans; slowest per tick: 1,2,1,1,2,0
    c = _tick_program(table)
    costliest = estimate(c)                                  # every tick its costliest branch: 6 × 4 matmuls
    assert costliest.flops == 6 * 4 * matmul and costliest.lockstep_ticks == 0
    lockstep = estimate(c, tick_branches=table)
    assert lockstep.flops == (3 * 1 + 2 * 4) * matmul and lockstep.lockstep_ticks == 6
    idle = estimate(c, tick_branches=np.zeros_like(table))
    assert idle.flops == 0 and idle.compute_s < lockstep.compute_s < costliest.compute_s
    # A table that does not fit the loop (other tick count) leaves the costliest-branch price.
    assert estimate(c, tick_branches=table[:, :4]).flops == costliest.flops


def swiglu(x, w1, w2, w3):
    return (jax.nn.silu(x @ w1) * (x @ w3)) @ w2 + x


@pytest.mark.parametrize("target", ["v5p:1", "v6e:1"])
def test_compute_is_within_20_percent_of_xla_tpu_cost_model(target):
    mesh = mesh_of(target)
    c = compiled(swiglu, mesh, (P(), (8192, 4096)), (P(), (4096, 8192)), (P(), (8192, 4096)), (P(), (4096, 8192)))
    e = estimate(c)
    assert e.comm_s == 0 and e.xla_optimal_s > 0
    assert e.compute_s == pytest.approx(e.xla_optimal_s, rel=0.2)
    assert e.flops == 3 * 2 * 8192 * 4096 * 8192


def test_h100_dense_bf16_gemm_runs_at_the_measured_rate():
    n = 8192
    c = compiled(lambda a, b: a @ b, mesh_of("h100"), (P(), (n, n)), (P(), (n, n)))
    assert 2 * n**3 / estimate(c).compute_s == pytest.approx(715e12, rel=0.1)
    assert 2 * n**3 / estimate(c, roofline=True).compute_s == pytest.approx(989.4e12, rel=1e-6)
    assert 2 * n**3 / estimate(c, "h800").compute_s == pytest.approx(715e12, rel=0.1)   # same compute as an H100


def test_a_small_cublas_gemm_is_bound_by_its_operands_and_output_not_its_workspace():
    c = compiled(lambda a, b: a @ b, mesh_of("h100"), (P(), (4096, 64)), (P(), (64, 64)), dtype=jnp.float32,
                 xla_gpu_enable_triton_gemm=False)
    assert "custom-call" in opcodes(c)
    moved = (4096 * 64 + 64 * 64 + 4096 * 64) * 4
    assert estimate(c).compute_s == pytest.approx(moved / (H100.hbm_bytes_per_s * H100.efficiency["memory"]))


def test_replica_group_forms():
    assert parse_replica_groups("{{0,1},{2,3}}", 4) == ((0, 1), (2, 3))
    assert parse_replica_groups("{}", 4) == ((0, 1, 2, 3),)
    assert parse_replica_groups(None, 2) == ((0, 1),)
    assert parse_replica_groups("[2,4]<=[8]", 8) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert parse_replica_groups("[4,2]<=[2,4]T(1,0)", 8) == ((0, 4), (1, 5), (2, 6), (3, 7))
    # Mesh axes: data=2 (outer) × expert=4; the groups of `expert`, and of `data`.
    assert parse_replica_groups("mesh['data'=2,'expert'=4] {'expert'}", 8) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert parse_replica_groups("mesh['data'=2,'expert'=4] {'data'}", 8) == ((0, 4), (1, 5), (2, 6), (3, 7))
    # Devices laid out transposed (`device_ids`: iota over [2,4], transposed): mesh position (a, b) holds 4b + a.
    assert parse_replica_groups("mesh['a'=4,'b'=2]", 8, "([2,4]T(1,0)) {'a'}") == ((0, 1, 2, 3), (4, 5, 6, 7))
    # A sub-axis: the middle factor 2 of an axis of 8 (pre-size 2).
    assert parse_replica_groups("mesh['a'=8] {'a':(2)2}", 8) == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert parse_pairs("{{0,1},{1,2},{2,0}}") == ((0, 1), (1, 2), (2, 0))


def test_the_replica_groups_seen_in_a_compiled_program_agree_with_its_explicit_ones():
    # data=2 × expert=4 on 8 H100s: the expert all-to-all prints explicit groups, the expert all-reduce mesh axes.
    mesh = Mesh(np.array(targets.devices("h100x8")).reshape(2, 4), ("data", "expert"))

    def body(x):
        return jax.lax.all_to_all(x, "expert", 0, 0, tiled=True), jax.lax.psum(x, "expert")

    fn = jax.shard_map(body, mesh=mesh, in_specs=P(("data", "expert")), out_specs=(P(("data", "expert")), P("data")),
                       check_vma=False)
    c = compiled(fn, mesh, (P(("data", "expert")), (64, 128)), dtype=jnp.float32)
    module = parse_module(c.as_text())
    groups = {parse_replica_groups(i.attribute("replica_groups"), 8, i.attribute("device_ids"))
              for comp in module.computations.values() for i in comp.instructions
              if i.opcode.removesuffix("-start") in ("all-to-all", "all-reduce")}
    assert groups == {((0, 1, 2, 3), (4, 5, 6, 7))}


def test_a_group_across_nodes_is_priced_over_infiniband():
    links = Links(H100, tuple(p // 8 for p in range(16)))
    size = 64 * MIB
    inside = price_groups("all-reduce", size, ((0, 1, 2, 3, 4, 5, 6, 7),), links)
    across = price_groups("all-reduce", size, ((0, 8),), links)
    assert inside.seconds == pytest.approx(2 * 7 / 8 * size / NVLINK) and not inside.crosses_nodes
    assert across.seconds == pytest.approx(size / IB) and across.crosses_nodes
    # 16 devices, 8 per node: 8 rings side by side, each crossing through its own NIC: 1/8 of the bytes on IB.
    both = price_groups("all-reduce", size, (tuple(range(16)),), links)
    assert both.seconds == pytest.approx(2 * 15 / 16 * size / 8 / IB)
    # An all-to-all over both nodes: each device's chunks for the other node (half its buffer) leave by its NIC,
    # 7/16 go to its own node's other devices.
    a2a = price_groups("all-to-all", size, (tuple(range(16)),), links)
    assert a2a.seconds == pytest.approx(size / 2 / IB)
    assert (a2a.bytes_sent, a2a.bytes_internode) == (pytest.approx(15 / 16 * size), pytest.approx(size / 2))
    assert both.bytes_internode == pytest.approx(2 * 15 / 16 * size / 8) and inside.bytes_internode == 0
    assert price_pairs(size, parse_pairs("{{0,8},{8,0}}"), links).seconds == pytest.approx(size / IB)
    assert price_pairs(size, parse_pairs("{{0,8},{8,0}}"), links).bytes_internode == size
    assert price_pairs(size, parse_pairs("{{0,1},{1,0}}"), links).seconds == pytest.approx(size / NVLINK)
    assert price_pairs(size, parse_pairs("{{0,1},{1,0}}"), links).bytes_internode == 0
    # The H800 cluster's slower NVLink sets the time inside a node.
    assert price_groups("all-reduce", size, ((0, 1),), Links(H800, links.nodes)).seconds == pytest.approx(
        size / H800.scale_up_bytes_per_s)


def test_a_compiled_program_on_two_nodes_takes_the_node_of_each_device():
    mesh = mesh_of("h100x16", (2, 8), ("node", "gpu"))

    def body(x):
        return jax.lax.psum(x, "node"), jax.lax.psum(x * 2, "gpu")

    fn = jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=(P(), P()), check_vma=False)
    c = compiled(fn, mesh, (P(), (4096, 4096)))
    e = estimate(c)
    size = 4096 * 4096 * 2
    assert e.comm_s == pytest.approx(size / IB + 2 * 7 / 8 * size / NVLINK, rel=1e-6)
    assert e.bytes_all_reduce == pytest.approx(size + 2 * 7 / 8 * size)
    assert e.bytes_internode["all-reduce"] == pytest.approx(size)   # the psum over "node" only


def test_est_mfu_gives_no_figure_that_cannot_be_right():
    c = compiled(lambda a, b: a @ b, mesh_of("h100"), (P(), (4096, 4096)), (P(), (4096, 4096)))
    e = estimate(c)
    flops = 2 * 4096**3
    assert est_mfu(flops, e) == pytest.approx(flops / (e.est_step_s * 989.4e12))
    assert est_mfu(flops, e) == pytest.approx(715 / 989.4, rel=0.01)
    assert est_mfu(2 * flops, e) is None                      # more than the peak allows
    assert est_mfu(flops, dataclasses.replace(e, est_step_s=0.0)) is None
    assert est_mfu(flops, dataclasses.replace(e, est_step_s=float("nan"))) is None
    assert est_mfu(-1.0, e) is None


def test_an_instruction_may_span_lines_and_a_computation_may_end_with_attributes():
    text = "\n".join([
        "HloModule m, is_scheduled=true, num_partitions=2",
        "%side (p: f32[8]) -> f32[8] {",
        "  ROOT %p = f32[8]{0} parameter(0)",
        '}, execution_thread="sparsecore"',
        "ENTRY %main (a: f32[8]) -> f32[8] {",
        "  %a = f32[8]{0} parameter(0)",
        '  %k = f32[8]{0} custom-call(%a), custom_call_target="tpu_custom_call", frontend_attributes={x="{',
        '}"}, backend_config={"custom_call_config":{"cost_estimate":{"flops":"64","bytes_accessed":"8"}}}',
        "  ROOT %b = f32[8]{0} add(%k, %a)",
        "}",
    ])
    module = parse_module(text)
    assert set(module.computations) == {"side", "main"} and module.num_partitions == 2
    assert [i.opcode for i in module.entry_computation.instructions] == ["parameter", "custom-call", "add"]
    call = module.entry_computation.by_name["k"]
    assert call.backend_config["custom_call_config"]["cost_estimate"]["flops"] == "64"


def test_a_program_is_priced_only_on_a_chip_of_the_kind_it_was_compiled_for():
    c = compiled(lambda a, b: a @ b, mesh_of("h100"), (P(), (256, 256)), (P(), (256, 256)))
    assert estimate(c, "h800").chip == "h800"
    with pytest.raises(ValueError, match="compiled for h100"):
        estimate(c, "v5p")


ASYNC_WRAPPED = """HloModule m, is_scheduled=true, num_partitions=2

%wrapped (p: f32[16777216]) -> f32[16777216] {
  %p = f32[16777216]{0} parameter(0)
  ROOT %a2a = f32[16777216]{0} all-to-all(%p), channel_id=1, replica_groups={{0,1}}, dimensions={0}
}

ENTRY %main (x: f32[16777216], y: f32[4194304]) -> (f32[16777216], f32[4194304]) {
  %x = f32[16777216]{0} parameter(0)
  %y = f32[4194304]{0} parameter(1)
  %start = ((f32[16777216]{0}), f32[16777216]{0}) async-start(%x), calls=%wrapped
  %c = f32[4194304]{0} copy(%y)
  %done = f32[16777216]{0} async-done(%start)
  ROOT %t = (f32[16777216]{0}, f32[4194304]{0}) tuple(%done, %c)
}
"""


def test_an_async_start_wrapping_a_collective_overlaps_the_compute_between():
    e = estimate(None, targets.devices("h100x8")[:2], hlo_text=ASYNC_WRAPPED)
    copy_s = 2 * 4194304 * 4 / (H100.hbm_bytes_per_s * H100.efficiency["memory"])
    assert e.comm_s == pytest.approx(16777216 * 4 / 2 / NVLINK) and e.bytes_all_to_all == 16777216 * 4 / 2
    assert e.compute_s == pytest.approx(copy_s)
    assert e.exposed_comm_s == pytest.approx(e.comm_s - copy_s) and e.async_collectives == 1
