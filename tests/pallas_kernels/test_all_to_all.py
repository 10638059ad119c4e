"""The Pallas TPU all-to-all (remote DMAs, simulated by TPU interpret mode on 4 and 8 CPU devices) against
jax.lax.all_to_all, values and gradients; and as the expert-parallel transport, against the default one."""

import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest

from pallas_kernels.all_to_all import all_to_all
from sharding.expert_parallel import expert_parallel_ffn_local
from tests.fast_compile import ROOT, subprocess_env

MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import functools, os, time
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental.pallas import tpu as pltpu
    from jax.sharding import Mesh, PartitionSpec as P
    from pallas_kernels.all_to_all import all_to_all
    from sharding.expert_parallel import expert_parallel_ffn
    from sharding.mesh import build_mesh

    assert jax.device_count() == 8
    start = time.time()
    rng = np.random.default_rng(0)
    pallas = functools.partial(all_to_all, interpret=pltpu.InterpretParams())   # simulated TPUs: remote DMAs

    def per_device(fn, mesh, split, concat, tiled, check_vma=True):
        body = lambda a: fn(a, "x", split, concat, tiled=tiled)
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=check_vma))

    # (devices, per-device shape, split, concat, tiled, dtype); the first is the EP exchange's [EP, C, D] call.
    CASES = [(8, (8, 2, 128), 0, 0, False, jnp.bfloat16), (8, (3, 16), 1, 0, True, jnp.float32),
             (4, (2, 4, 3), 1, 0, False, jnp.int32), (4, (8, 3), 0, 1, True, jnp.float32)]
    for n, shape, split, concat, tiled, dtype in CASES:
        mesh = Mesh(np.asarray(jax.devices()[:n]), ("x",))
        x = jnp.asarray(rng.normal(size=(n * shape[0], *shape[1:])) * 100, dtype)
        want = per_device(jax.lax.all_to_all, mesh, split, concat, tiled)(x)
        got = per_device(pallas, mesh, split, concat, tiled)(x)
        assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
        np.testing.assert_array_equal(got, want, err_msg=str((n, shape, split, concat, tiled)))
        assert not np.array_equal(got, x)   # it did move blocks
    unchecked = per_device(pallas, mesh, 0, 1, True, check_vma=False)(x)   # outside vma typing too
    np.testing.assert_array_equal(unchecked, want)

    # Gradient: the transpose is the all-to-all with split and concat swapped (here not its own inverse).
    ct = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    grad = lambda fn: jax.grad(lambda a: (per_device(fn, mesh, 0, 1, True)(a) * ct).sum())(x)
    np.testing.assert_array_equal(grad(pallas), grad(jax.lax.all_to_all))
    print(f"all_to_all ok {time.time() - start:.1f}s")

    # As the EP transport: skewed routing, one row per peer per round slot, so several rounds; forward and
    # backward must give exactly what lax.all_to_all gives.
    T, K, E, D, F = 32, 2, 8, 16, 8
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    w = [jnp.asarray(rng.normal(size=s) / 4, jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D))]
    weights = jnp.asarray(rng.random((T, K)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    experts = jnp.asarray(np.where(rng.random((T, K)) < 0.7, 0, rng.integers(0, E, (T, K))), jnp.int32)
    mesh = build_mesh({"data": 2, "expert": 4})

    def run(transport):
        def loss(x, weights, *w):
            out, stats = expert_parallel_ffn(x, experts, weights, *w, mesh=mesh, capacity_factor=1.0,
                                             block_multiple=1, all_to_all=transport)
            return (out * ct).sum(), (out, stats)
        return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3, 4), has_aux=True))(x, weights, *w)

    (_, (out, stats)), grads = run(pallas)
    (_, (out_ref, stats_ref)), grads_ref = run(None)
    assert int(stats.rounds.max()) > 1 and int(stats.dropped_rows.sum()) == 0
    np.testing.assert_array_equal(out, out_ref)
    for name, g, r in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, grads_ref):
        np.testing.assert_array_equal(g, r, err_msg=name)
    print(f"ok {time.time() - start:.1f}s rounds={int(stats.rounds.max())}")
""")


def test_pallas_all_to_all_equals_lax_and_serves_as_ep_transport():
    result = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    print(result.stdout)
    assert result.returncode == 0 and "\nok " in result.stdout, result.stderr[-3000:]


def test_transport_callable_only_for_the_all_to_all_impl():
    x, e = jnp.zeros((4, 8)), jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(ValueError, match="expert_parallel.all_to_all .* not impl='ragged'"):
        expert_parallel_ffn_local(x, e, e.astype(jnp.float32), jnp.zeros((2, 8, 4)), jnp.zeros((2, 8, 4)),
                                  jnp.zeros((2, 4, 8)), expert_axis="expert", capacity=8, impl="ragged",
                                  all_to_all=all_to_all)
