"""Expert parallelism: buffer sizes, layout checks, node-limited routing, and (on 8 simulated CPU devices) the
exchange against the single-device MoE computation, values and gradients, uniform and skewed routing."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sharding.ep_buffers import ep_buffer_size
from sharding.ep_layout import (check_expert_parallel, expert_ranks, group_ranks, max_ranks_per_token,
                                ranks_per_token)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
        expert_parallel_ffn(x, e, w, wg, wg, wd, mesh=mesh, expert_axis="experts")
    with pytest.raises(ValueError, match=r"w_down_EFD\.shape"):
        expert_parallel_ffn(x, e, w, wg, wg, wd[:, :, :4], mesh=mesh)


def group_limited_top_k(scores_TE, n_group, topk_group, k):
    """Top-k experts among each token's best `topk_group` groups (group score: sum of its top-2)."""
    t, e = scores_TE.shape
    grouped_TGe = scores_TE.reshape(t, n_group, e // n_group)
    group_score_TG = np.sort(grouped_TGe, axis=-1)[..., -2:].sum(-1)
    kept_TG = np.argsort(-group_score_TG, axis=1)[:, :topk_group]
    keep_TG = np.zeros((t, n_group), bool)
    keep_TG[np.arange(t)[:, None], kept_TG] = True
    masked_TE = np.where(keep_TG[:, :, None], grouped_TGe, -np.inf).reshape(t, e)
    return np.argsort(-masked_TE, axis=1)[:, :k]


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


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import os, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from pallas_kernels.dispatch.reference import combine, dispatch
    from pallas_kernels.grouped_matmul.reference import grouped_matmul
    from sharding.ep_collectives import ragged_all_to_all_reference
    from sharding.ep_report import format_rows, measure_buffers
    from sharding.expert_parallel import expert_parallel_ffn
    from sharding.mesh import build_mesh

    assert jax.device_count() == 8
    start = time.time()
    T, K, E, D, F = 64, 3, 8, 16, 24
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    w = (jnp.asarray(rng.normal(size=(E, D, F)) / 4, jnp.float32), jnp.asarray(rng.normal(size=(E, D, F)) / 4,
         jnp.float32), jnp.asarray(rng.normal(size=(E, F, D)) / 4, jnp.float32))
    weights = jnp.asarray(rng.random((T, K)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    uniform = jnp.asarray(np.argsort(rng.random((T, E)), axis=1)[:, :K], jnp.int32)
    skewed = jnp.asarray(np.where(rng.random((T, K)) < 0.9, 0, rng.integers(0, E, (T, K))), jnp.int32)

    def single_device(x, weights, experts, wg, wu, wd):   # the MoE layer's route-free path
        sent = dispatch(x, experts, E)
        h = jax.nn.silu(grouped_matmul(sent.x_ND, wg, sent.group_sizes_E)) * grouped_matmul(sent.x_ND, wu,
                                                                                        sent.group_sizes_E)
        return combine(grouped_matmul(h, wd, sent.group_sizes_E), weights, sent.order_N, jnp.float32)

    def check(mesh_sizes, experts, **kw):
        mesh = build_mesh(mesh_sizes)
        def loss(x, weights, wg, wu, wd):
            out, stats = expert_parallel_ffn(x, experts, weights, wg, wu, wd, mesh=mesh, **kw)
            return (out * ct).sum(), (out, stats)
        argnums = (0, 1, 2, 3, 4)
        (_, (out, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(x, weights, *w)
        ref_loss = lambda x, weights, *w: (single_device(x, weights, experts, *w) * ct).sum()
        ref_grads = jax.grad(ref_loss, argnums)(x, weights, *w)
        np.testing.assert_allclose(out, single_device(x, weights, experts, *w), rtol=1e-5, atol=1e-6)
        for name, g, r in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=2e-6, err_msg=f"d{name} on {mesh_sizes}")
        assert int(stats.dropped_rows.sum()) == 0 and int(stats.rows_received.sum()) == T * K
        assert int(stats.peak_rows.max()) <= int(stats.buffer_rows.max())
        print(f"{mesh_sizes} {kw}: rounds={int(stats.rounds.max())} peak={int(stats.peak_rows.max())} "
              f"buffer={int(stats.buffer_rows.max())} max_received={int(stats.rows_received.max())}")
        return stats

    for sizes in ({"data": 2, "expert": 4}, {"expert": 8}, {"fsdp": 4, "expert": 2}):
        check(sizes, uniform)
    check({"data": 2, "expert": 4}, uniform, impl="ragged_reference", capacity_factor=1.0, block_multiple=1)
    stats = check({"expert": 8}, skewed, capacity_factor=1.0, block_multiple=1)
    assert int(stats.rounds.max()) > 1 and int(stats.overflow_rows.sum()) > 0   # skew took extra rounds
    stats = check({"data": 2, "expert": 4}, skewed, impl="ragged_reference", capacity_factor=1.0, block_multiple=1)
    assert int(stats.rounds.max()) > 1

    # bfloat16 activations and weights, as the model runs them: same rows, same grouped matmuls.
    bf = lambda tree: jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)
    mesh = build_mesh({"expert": 8})
    out, _ = jax.jit(lambda *a: expert_parallel_ffn(*a, mesh=mesh))(bf(x), uniform, weights, *bf(w))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), single_device(bf(x), weights, uniform, *bf(w)).astype(
        jnp.bfloat16).astype(np.float32), rtol=2e-2, atol=2e-2)

    # max_rounds caps the rounds: rows past the cap are counted as dropped, never silently lost.
    mesh = build_mesh({"expert": 8})
    _, capped = jax.jit(lambda *a: expert_parallel_ffn(*a, mesh=mesh, capacity_factor=1.0, block_multiple=1,
                                                       max_rounds=1))(x, skewed, weights, *w)
    assert int(capped.dropped_rows.sum()) > 0
    assert int(capped.rows_received.sum()) + int(capped.dropped_rows.sum()) == T * K

    # The ragged transport: XLA:CPU cannot compile ragged-all-to-all, so only its lowering is checked here.
    ragged = lambda *a: expert_parallel_ffn(*a, mesh=mesh, impl="ragged")[0].sum()
    for fn in (ragged, jax.grad(ragged, argnums=(0, 3, 4, 5))):
        assert "ragged_all_to_all" in jax.jit(fn).lower(x, uniform, weights, *w).as_text()

    # The all_gather reference of ragged_all_to_all reproduces the example in its docstring.
    pair = Mesh(np.asarray(jax.devices()[:2]), ("x",))
    args = [jnp.array(a, jnp.int32) for a in ([1, 2, 2, 3, 4, 0], [0] * 8, [0, 1, 0, 1], [1, 2, 1, 1],
                                              [0, 0, 1, 2], [1, 1, 2, 1])]
    shard = lambda *a: ragged_all_to_all_reference(*a, axis_name="x")
    got = jax.shard_map(shard, mesh=pair, in_specs=P("x"), out_specs=P("x"))(*args)
    assert got.tolist() == [1, 3, 0, 0, 2, 2, 4, 0], got

    print("buffer rows per rank, EP=8, 64 tokens/rank, top-8 of 64 experts, capacity_factor=1.25:")
    print(format_rows(measure_buffers(build_mesh({"expert": 8}), tokens_per_rank=64, top_k=8, n_experts=64)))
    print(f"ok {time.time() - start:.1f}s")
""")


def test_expert_parallel_equals_single_device_on_8_devices():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    print(result.stdout)
    assert result.returncode == 0 and "\nok " in result.stdout, result.stderr[-3000:]
