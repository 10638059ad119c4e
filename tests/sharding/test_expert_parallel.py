"""Expert parallelism: buffer sizes, layout checks, node-limited routing, and (on 8 simulated CPU devices) the
exchange against the single-device MoE computation, values and gradients, uniform and skewed routing."""

import functools
from types import SimpleNamespace

import numpy as np
import pytest

from dsv3_jax.model.moe.experts import swiglu_experts
from pallas_kernels.grouped_matmul.reference import grouped_matmul

from sharding.ep_buffers import ep_buffer_size, exchange_buffers, expected_destinations
from sharding.expert_parallel import ExchangeOptions, expert_parallel_ffn
from sharding.ep_layout import (check_expert_parallel, expert_ranks, group_limited_top_k, group_ranks,
                                max_ranks_per_token, ranks_per_token)
from tests.fast_compile import cheap_compiles, cpu_devices  # noqa: F401  (fixtures; cheap_compiles is autouse)

SWIGLU = functools.partial(swiglu_experts, grouped_matmul=grouped_matmul)   # the experts the exchange runs


@pytest.mark.parametrize("tokens, k, experts, ep, cf", [(4096, 8, 256, 8, 1.25), (4096, 8, 256, 64, 1.0),
                                                        (512, 6, 64, 16, 1.5), (100, 2, 8, 8, 1.0)])
def test_buffer_is_capacity_factor_times_balanced_not_worst_case(tokens, k, experts, ep, cf):
    b = ep_buffer_size(tokens, k, experts, ep, capacity_factor=cf, block_multiple=8, d_model=7168)
    assert b.balanced_rows == tokens * k
    assert cf * b.balanced_rows <= b.buffer_rows < cf * b.balanced_rows + ep * 8
    assert b.worst_case_rows == ep * tokens * min(k, experts // ep)   # every rank's rows that can reach one rank
    assert b.worst_case_rows <= b.balanced_rows * min(ep, experts / k)
    assert b.buffer_bytes == b.buffer_rows * 7168 * 2
    assert b.rounds_for(b.balanced_rows) == -(-b.balanced_rows // b.capacity_per_peer)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_experts=8, ep=3), "mesh.expert=3 does not divide n_routed_experts=8"),
    (dict(n_experts=8, ep=2, impl="nccl"), "expert_parallel.impl='nccl'"),
    (dict(n_experts=8, ep=2, capacity_factor=0.0), "expert_parallel.capacity_factor=0.0"),
    (dict(n_experts=8, ep=2, max_rounds=0), "expert_parallel.max_rounds=0"),
    (dict(n_experts=8, ep=2, tokens=10, token_shards=4), "tokens=10 is not divisible"),
])
def test_bad_configuration_fails_fast_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")) as err:
        check_expert_parallel(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_call_fails_before_tracing():
    import jax
    import jax.numpy as jnp

    from sharding.expert_parallel import expert_parallel_ffn
    from sharding.mesh import build_mesh

    mesh = build_mesh({}, jax.devices()[:1])
    x, e, w = jnp.zeros((4, 8)), jnp.zeros((4, 2), jnp.int32), jnp.zeros((4, 2))
    wg, wd = jnp.zeros((4, 8, 6)), jnp.zeros((4, 6, 8))
    with pytest.raises(ValueError, match="expert_axis='experts'"):
        expert_parallel_ffn(x, e, w, (wg, wg, wd), expert_ffn=SWIGLU, mesh=mesh, expert_axis="experts")
    with pytest.raises(ValueError, match=r"expert_weights\[2\]\.shape=\(3, 6, 8\): expected 4 experts first"):
        expert_parallel_ffn(x, e, w, (wg, wg, wd[:3]), expert_ffn=SWIGLU, mesh=mesh)


@pytest.mark.parametrize("ep", [2, 4, 8, 16, 32])
def test_node_limited_routing_reaches_at_most_m_ranks(ep):
    n_experts, n_group, topk_group, k = 64, 8, 4, 8
    layout = group_ranks(n_group, ep)
    rank_E = expert_ranks(n_experts, ep)
    for g, ranks in enumerate(layout):   # groups of contiguous experts sit on the ranks the helper names
        assert tuple(sorted(set(rank_E[g * 8:(g + 1) * 8]))) == ranks
    experts_TK = group_limited_top_k(np.random.default_rng(ep).random((512, n_experts)), n_group, topk_group, k)
    reached_T = ranks_per_token(experts_TK, n_experts, ep)
    bound = max_ranks_per_token(n_group, topk_group, ep)
    assert bound == min(ep, topk_group * max(1, ep // n_group))
    assert reached_T.max() <= bound
    unlimited_T = ranks_per_token(np.argsort(np.random.default_rng(0).random((512, n_experts)), 1)[:, :k],
                                  n_experts, ep)
    if bound < min(ep, k):
        assert unlimited_T.max() > bound   # without the group limit tokens do reach more ranks


def test_groups_that_do_not_map_onto_whole_ranks_fail():
    with pytest.raises(ValueError, match="mesh.expert=4 and n_group=6"):
        group_ranks(6, 4)


T, K, E, D, F = 64, 3, 8, 16, 24   # tokens, experts per token, experts, model and expert widths


@pytest.fixture(scope="module")
def moe(cpu_devices):
    """One MoE layer's inputs, weights and cotangent; uniform routing (K distinct experts per token) and skewed
    routing (90% of the slots to expert 0)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    w = tuple(jnp.asarray(rng.normal(size=shape) / 4, jnp.float32) for shape in ((E, D, F), (E, D, F), (E, F, D)))
    weights = jnp.asarray(rng.random((T, K)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    uniform = jnp.asarray(np.argsort(rng.random((T, E)), axis=1)[:, :K], jnp.int32)
    skewed = jnp.asarray(np.where(rng.random((T, K)) < 0.9, 0, rng.integers(0, E, (T, K))), jnp.int32)
    return SimpleNamespace(x=x, w=w, weights=weights, ct=ct, routing={"uniform": uniform, "skewed": skewed})


def single_device(x, weights, experts, wg, wu, wd):
    """The MoE layer's route-free path on one device."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.dispatch.reference import combine, dispatch

    sent = dispatch(x, experts, E)
    h = jax.nn.silu(grouped_matmul(sent.x_ND, wg, sent.group_sizes_E)) * grouped_matmul(sent.x_ND, wu,
                                                                                    sent.group_sizes_E)
    return combine(grouped_matmul(h, wd, sent.group_sizes_E), weights, sent.order_N, jnp.float32)


TIGHT = dict(capacity_factor=1.0, block_multiple=1)   # one row per peer per slot to spare: skew takes extra rounds


@pytest.mark.parametrize("mesh_sizes, routing, kwargs, extra_rounds, overflows", [
    pytest.param({"data": 2, "expert": 4}, "uniform", {}, False, False, id="data2-expert4-uniform"),
    pytest.param({"expert": 8}, "uniform", {}, False, False, id="expert8-uniform"),
    pytest.param({"fsdp": 4, "expert": 2}, "uniform", {}, False, False, id="fsdp4-expert2-uniform"),
    pytest.param({"data": 2, "expert": 4}, "uniform", dict(impl="ragged_reference", **TIGHT), False, False,
                 id="data2-expert4-uniform-ragged_reference"),
    pytest.param({"expert": 8}, "skewed", TIGHT, True, True, id="expert8-skewed"),
    pytest.param({"data": 2, "expert": 4}, "skewed", dict(impl="ragged_reference", **TIGHT), True, False,
                 id="data2-expert4-skewed-ragged_reference"),
    pytest.param({"expert": 8}, "uniform", dict(node_size=4), False, False, id="expert8-nodes-of-4-uniform"),
    pytest.param({"expert": 8}, "skewed", dict(node_size=2, **TIGHT), True, True, id="expert8-nodes-of-2-skewed"),
    pytest.param({"data": 2, "expert": 4}, "skewed", dict(node_size=2, recompute=True, **TIGHT), True, False,
                 id="data2-expert4-nodes-of-2-skewed-recompute"),
])
def test_expert_parallel_equals_single_device(moe, cpu_devices, mesh_sizes, routing, kwargs, extra_rounds, overflows):
    """On 8 devices the exchange gives the single-device layer's output and gradients, drops no row and fits its
    buffers; skewed routing takes extra rounds (and with the all_to_all transport, overflows the first). Nodes of
    4 or 2 ranks: two hops (node, then rank inside the node)."""
    import jax

    from sharding.expert_parallel import expert_parallel_ffn
    from sharding.mesh import build_mesh

    mesh, experts = build_mesh(mesh_sizes, cpu_devices), moe.routing[routing]
    where = f"{mesh_sizes} {routing} {kwargs}"

    def loss(x, weights, wg, wu, wd):
        out, stats = expert_parallel_ffn(x, experts, weights, (wg, wu, wd), expert_ffn=SWIGLU, mesh=mesh,
                                         options=ExchangeOptions(**kwargs))
        return (out * moe.ct).sum(), (out, stats)

    argnums = (0, 1, 2, 3, 4)
    (_, (out, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(moe.x, moe.weights, *moe.w)
    ref_loss = lambda x, weights, *w: (single_device(x, weights, experts, *w) * moe.ct).sum()
    ref_grads = jax.grad(ref_loss, argnums)(moe.x, moe.weights, *moe.w)
    np.testing.assert_allclose(out, single_device(moe.x, moe.weights, experts, *moe.w), rtol=1e-5, atol=1e-6,
                               err_msg=f"output on {where}")
    for name, g, r in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=2e-6, err_msg=f"d{name} on {where}")
    assert int(stats.dropped_rows.sum()) == 0, f"{int(stats.dropped_rows.sum())} rows dropped on {where}"
    assert int(stats.rows_received.sum()) == T * K, f"{int(stats.rows_received.sum())} rows received, not {T * K}"
    assert int(stats.peak_rows.max()) <= int(stats.buffer_rows.max()), \
        f"peak {int(stats.peak_rows.max())} rows > buffer {int(stats.buffer_rows.max())} rows on {where}"
    if extra_rounds:
        assert int(stats.rounds.max()) > 1, f"skewed routing took {int(stats.rounds.max())} round on {where}"
    if overflows:
        assert int(stats.overflow_rows.sum()) > 0, f"skewed routing overflowed no row on {where}"


def test_bfloat16_activations_and_weights(moe, cpu_devices):
    """bfloat16 activations and weights, as the model runs them: same rows, same grouped matmuls."""
    import jax
    import jax.numpy as jnp

    from sharding.expert_parallel import expert_parallel_ffn
    from sharding.mesh import build_mesh

    bf = lambda tree: jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)
    mesh, uniform = build_mesh({"expert": 8}, cpu_devices), moe.routing["uniform"]
    run = jax.jit(lambda x, e, g, w: expert_parallel_ffn(x, e, g, w, expert_ffn=SWIGLU, mesh=mesh))
    out, _ = run(bf(moe.x), uniform, moe.weights, bf(moe.w))
    assert out.dtype == jnp.bfloat16, out.dtype
    want = single_device(bf(moe.x), moe.weights, uniform, *bf(moe.w)).astype(jnp.bfloat16)
    np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), rtol=2e-2, atol=2e-2)


def test_max_rounds_caps_rounds_and_counts_the_rest_as_dropped(moe, cpu_devices):
    """Rows past the cap are counted as dropped, never silently lost."""
    import jax

    from sharding.expert_parallel import expert_parallel_ffn
    from sharding.mesh import build_mesh

    mesh = build_mesh({"expert": 8}, cpu_devices)
    options = ExchangeOptions(max_rounds=1, node_size=2, **TIGHT)
    _, capped = jax.jit(lambda x, e, g, w: expert_parallel_ffn(x, e, g, w, expert_ffn=SWIGLU, mesh=mesh,
                                                               options=options))(moe.x, moe.routing["skewed"],
                                                                                 moe.weights, moe.w)
    dropped, received = int(capped.dropped_rows.sum()), int(capped.rows_received.sum())
    assert dropped > 0, "max_rounds=1 dropped no row of the skewed routing"
    assert received + dropped == T * K, f"{received} received + {dropped} dropped != {T * K} rows"


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_ragged_transport_lowers_to_ragged_all_to_all(moe, cpu_devices, direction):
    """XLA:CPU cannot compile ragged-all-to-all, so only the lowering of impl='ragged' is checked."""
    import jax

    from sharding.expert_parallel import expert_parallel_ffn
    from sharding.mesh import build_mesh

    mesh = build_mesh({"expert": 8}, cpu_devices)
    ragged = lambda x, e, g, w: expert_parallel_ffn(x, e, g, w, expert_ffn=SWIGLU, mesh=mesh,
                                                    options=ExchangeOptions(impl="ragged"))[0].sum()
    fn = ragged if direction == "forward" else jax.grad(ragged, argnums=(0, 3))
    text = jax.jit(fn).lower(moe.x, moe.routing["uniform"], moe.weights, moe.w).as_text()
    assert "ragged_all_to_all" in text, f"the {direction} pass lowered without ragged_all_to_all"


def test_ragged_all_to_all_reference_reproduces_its_docstring_example(cpu_devices):
    """The all_gather reference of ragged_all_to_all, on 2 devices."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from sharding.ep_collectives import ragged_all_to_all_reference

    pair = Mesh(np.asarray(cpu_devices[:2]), ("x",))
    args = [jnp.array(a, jnp.int32) for a in ([1, 2, 2, 3, 4, 0], [0] * 8, [0, 1, 0, 1], [1, 2, 1, 1],
                                              [0, 0, 1, 2], [1, 1, 2, 1])]
    shard = lambda *a: ragged_all_to_all_reference(*a, axis_name="x")
    got = jax.shard_map(shard, mesh=pair, in_specs=P("x"), out_specs=P("x"))(*args)
    assert got.tolist() == [1, 3, 0, 0, 2, 2, 4, 0], got


def test_buffer_report_on_8_ranks(cpu_devices):
    """The buffer bench's measurement, EP=8, 64 tokens/rank, top-8 of 64 experts, capacity_factor=1.25: nothing
    dropped; balanced routing in one round within the buffer; skew in more rounds, never more buffer rows."""
    from experiments.bench.ep_buffers import measure_buffers
    from sharding.mesh import build_mesh

    rows = {r["routing"]: r for r in measure_buffers(build_mesh({"expert": 8}, cpu_devices), tokens_per_rank=64,
                                                     top_k=8, n_experts=64)}
    assert set(rows) == {"uniform", "skew90", "hot_rank"}
    assert all(r["dropped_rows"] == 0 and r["rows_total"] == 8 * 64 * 8 for r in rows.values()), rows
    assert rows["uniform"]["rounds"] == 1 and rows["skew90"]["rounds"] > 1, rows
    assert all(r["peak_rows"] <= r["buffer_rows"] for r in rows.values()), rows


def test_expected_destinations_of_the_router_rule():
    """Without groups the top-k of i.i.d. scores is a uniform k-subset: E[units] = U·(1 − C(E−E/U, k)/C(E, k)).
    With V3's groups (4 of 8) a token reaches at most 4 nodes and nearly always all 4 (a group is chosen for its
    top experts), more than the uniform-within-chosen-groups model's 3.63 that would undersize the buffers."""
    import math

    from sharding.ep_buffers import expected_destinations
    for units in (4, 8, 64):
        closed = units * (1 - math.comb(256 - 256 // units, 8) / math.comb(256, 8))
        assert abs(expected_destinations(256, 8, 1, 1, units) - closed) < 0.02 * closed, units
    nodes = expected_destinations(256, 8, 8, 4, 8)
    assert 3.8 < nodes <= 4.0, nodes
    assert nodes < expected_destinations(256, 8, 8, 4, 64) <= 8


def test_buffers_follow_expected_destinations_not_choices():
    """V3 widths on 64 ranks in nodes of 8: C₁ = ⌈f·T·d_node/N⌉, C₂ = ⌈f·T·d_rank/L⌉ (multiples of 8), expert passes
    of f·T·K rows; one node is one hop of ⌈f·T·d_rank/EP⌉."""
    b = exchange_buffers(4096, 256, 8, 64, 8, n_group=8, topk_group=4, capacity_factor=1.25)
    assert 3.8 < b.nodes_per_token <= 4.0 and 7.0 < b.ranks_per_token < 8.0, b
    assert b.capacities == (-(-int(np.ceil(1.25 * 4096 * b.nodes_per_token / 8)) // 8) * 8,
                            -(-int(np.ceil(1.25 * 4096 * b.ranks_per_token / 8)) // 8) * 8), b
    assert b.expert_rows == 1.25 * 4096 * 8
    one = exchange_buffers(4096, 256, 8, 64, 64, n_group=8, topk_group=4)
    assert len(one.capacities) == 1 and one.capacities[0] < 1.25 * 4096 * 8 / 64 + 8, one
    with pytest.raises(ValueError, match="mesh.expert_node_size=3"):
        exchange_buffers(4096, 256, 8, 64, 3)


def test_two_hops_move_rows_inside_nodes_and_across_once(moe, cpu_devices):
    """Nodes of 4 on 8 ranks: every all-to-all of the lowered step runs either among the ranks of equal local
    index across nodes ({0,4}, {1,5}, ...) or inside a node ({0..3}, {4..7}); none spans the whole axis."""
    import re

    import jax

    from sharding.mesh import build_mesh

    mesh = build_mesh({"expert": 8}, cpu_devices)
    fn = lambda x, e, g, w: expert_parallel_ffn(x, e, g, w, expert_ffn=SWIGLU, mesh=mesh,
                                                options=ExchangeOptions(node_size=4))[0].sum()
    text = jax.jit(jax.grad(fn, argnums=(0, 3))).lower(moe.x, moe.routing["uniform"], moe.weights, moe.w).as_text()
    groups = set(re.findall(r"all_to_all.*?replica_groups = dense<(\[\[.*?\]\])>", text))
    assert groups == {"[[0, 4], [1, 5], [2, 6], [3, 7]]", "[[0, 1, 2, 3], [4, 5, 6, 7]]"}, groups


def test_fp8_on_the_wire(moe, cpu_devices):
    """With an FP8 codec (E4M3, 1×128 power-of-two scales) the experts see the quantized rows and the backward's
    output gradient arrives quantized; the input gradient comes back unquantized (straight through). So the
    exchange equals the single-device layer on quantized inputs, its weight gradients are those of the quantized
    output gradient, and both hops (nodes of 2) reproduce the same tiles."""
    import jax

    from dsv3_jax.model.moe.backend import MoEKernels
    from sharding.mesh import build_mesh

    codec = MoEKernels().wire_codec(True, power_of_two=True)
    qdq = lambda a: codec[1](codec[0](a), a.dtype)
    mesh, experts = build_mesh({"expert": 8}, cpu_devices), moe.routing["uniform"]
    for node_size in (0, 2):
        def loss(x, weights, *w):
            out, _ = expert_parallel_ffn(x, experts, weights, w, expert_ffn=SWIGLU, mesh=mesh,
                                         options=ExchangeOptions(codec=codec, node_size=node_size))
            return (out * moe.ct).sum(), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3, 4), has_aux=True))(moe.x, moe.weights,
                                                                                             *moe.w)
        assert not np.allclose(qdq(moe.x), moe.x, rtol=1e-3), "the codec changed nothing"
        np.testing.assert_allclose(out, single_device(qdq(moe.x), moe.weights, experts, *moe.w), rtol=1e-5,
                                   atol=1e-6, err_msg=f"output, nodes of {node_size}")
        ref = lambda x, weights, *w: (single_device(x, weights, experts, *w) * qdq(moe.ct)).sum()
        ref_grads = jax.grad(ref, (0, 1, 2, 3, 4))(qdq(moe.x), moe.weights, *moe.w)
        for name, g, r in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=2e-6, err_msg=f"d{name}, nodes of {node_size}")


@pytest.mark.parametrize("mesh_sizes, node_size, groups", [
    pytest.param({"expert": 8}, 4, {4}, id="expert8-nodes-of-4"),
    pytest.param({"data": 2, "expert": 4}, 0, {4}, id="data2-expert4-one-node"),
    pytest.param({"expert": 8}, 1, set(), id="expert8-a-node-each"),
])
def test_node_transport_moves_the_hops_inside_nodes(moe, cpu_devices, mesh_sizes, node_size, groups):
    """ExchangeOptions.node_all_to_all carries every hop inside a node (with the node's size as its group) and no
    other; with lax standing in for it (the kernel it is for only runs on Hopper GPUs) the values and gradients are
    the default transport's."""
    import jax
    from jax import lax

    from sharding.expert_parallel import expert_parallel_ffn
    from sharding.mesh import build_mesh

    seen = set()

    def node_transport(x, axis, split, concat, *, group_size):
        seen.add(group_size)
        n = lax.axis_size(axis)
        return lax.all_to_all(x, axis, split, concat,
                              axis_index_groups=[list(range(g, g + group_size)) for g in range(0, n, group_size)])

    mesh, experts = build_mesh(mesh_sizes, cpu_devices), moe.routing["skewed"]

    def run(transport):
        def loss(x, weights, *w):
            options = ExchangeOptions(node_size=node_size, node_all_to_all=transport, **TIGHT)
            out, _ = expert_parallel_ffn(x, experts, weights, w, expert_ffn=SWIGLU, mesh=mesh, options=options)
            return (out * moe.ct).sum(), out
        return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3, 4), has_aux=True))(moe.x, moe.weights, *moe.w)

    (_, out), grads = run(node_transport)
    assert seen == groups, f"node transport called with groups {seen}, expected {groups}"
    (_, out_ref), grads_ref = run(None)
    np.testing.assert_array_equal(out, out_ref, err_msg="output")
    for name, g, r in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, grads_ref, strict=True):
        np.testing.assert_array_equal(g, r, err_msg=f"d{name}")
