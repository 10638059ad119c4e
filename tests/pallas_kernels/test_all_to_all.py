"""The Pallas TPU all-to-all (remote DMAs, simulated by TPU interpret mode on 4 and 8 CPU devices) against
jax.lax.all_to_all, values and gradients; and as the expert-parallel transport, against the default one."""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pallas_kernels.all_to_all import all_to_all
from sharding.expert_parallel import ExchangeOptions, expert_parallel_ffn, expert_parallel_ffn_local
from tests.sharding.test_expert_parallel import SWIGLU
from sharding.mesh import build_mesh
from tests.fast_compile import cheap_compiles, cpu_devices  # noqa: F401  (fixtures; cheap_compiles is autouse)

pallas = functools.partial(all_to_all, interpret=pltpu.InterpretParams())   # simulated TPUs: remote DMAs

# (devices, per-device shape, split, concat, tiled, dtype); the first is the EP exchange's [EP, C, D] call.
CASES = [(8, (8, 2, 128), 0, 0, False, jnp.bfloat16), (8, (3, 16), 1, 0, True, jnp.float32),
         (4, (2, 4, 3), 1, 0, False, jnp.int32), (4, (8, 3), 0, 1, True, jnp.float32)]
CASE_IDS = ["8dev-split0-concat0-bf16", "8dev-split1-concat0-tiled-f32", "4dev-split1-concat0-i32",
            "4dev-split0-concat1-tiled-f32"]
T, K, E, D, F = 32, 2, 8, 16, 8   # the EP transport test: tokens, experts per token, experts, widths


def per_device(fn, mesh, split, concat, tiled, check_vma=True):
    body = lambda a: fn(a, "x", split, concat, tiled=tiled)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=check_vma))


@pytest.fixture(scope="module")
def data(cpu_devices):
    """Inputs drawn in one order: one per case, the gradient's cotangent (for the last case), the EP layer's."""
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.normal(size=(n * shape[0], *shape[1:])) * 100, dtype)
          for n, shape, _, _, _, dtype in CASES]
    n, shape, split, concat, tiled, _ = CASES[-1]
    out_shape = jax.eval_shape(per_device(jax.lax.all_to_all, Mesh(np.asarray(cpu_devices[:n]), ("x",)), split,
                                          concat, tiled), xs[-1]).shape
    ct = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    ep = SimpleNamespace(x=jnp.asarray(rng.normal(size=(T, D)), jnp.float32),
                         w=[jnp.asarray(rng.normal(size=s) / 4, jnp.float32)
                            for s in ((E, D, F), (E, D, F), (E, F, D))],
                         weights=jnp.asarray(rng.random((T, K)), jnp.float32),
                         ct=jnp.asarray(rng.normal(size=(T, D)), jnp.float32),
                         experts=jnp.asarray(np.where(rng.random((T, K)) < 0.7, 0, rng.integers(0, E, (T, K))),
                                             jnp.int32))
    return SimpleNamespace(xs=xs, ct=ct, ep=ep)


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_pallas_all_to_all_equals_lax(data, cpu_devices, case):
    n, shape, split, concat, tiled, dtype = CASES[case]
    mesh, x = Mesh(np.asarray(cpu_devices[:n]), ("x",)), data.xs[case]
    want = per_device(jax.lax.all_to_all, mesh, split, concat, tiled)(x)
    got = per_device(pallas, mesh, split, concat, tiled)(x)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    np.testing.assert_array_equal(got, want, err_msg=str((n, shape, split, concat, tiled)))
    assert not np.array_equal(got, x), "the all-to-all moved no block"


def test_pallas_all_to_all_outside_vma_typing(data, cpu_devices):
    """shard_map(check_vma=False), on the last case."""
    n, _, split, concat, tiled, _ = CASES[-1]
    mesh, x = Mesh(np.asarray(cpu_devices[:n]), ("x",)), data.xs[-1]
    unchecked = per_device(pallas, mesh, split, concat, tiled, check_vma=False)(x)
    np.testing.assert_array_equal(unchecked, per_device(jax.lax.all_to_all, mesh, split, concat, tiled)(x))


def test_pallas_all_to_all_gradient(data, cpu_devices):
    """The transpose is the all-to-all with split and concat swapped (in the last case not its own inverse)."""
    n, _, split, concat, tiled, _ = CASES[-1]
    assert (split, concat) == (0, 1)
    mesh, x = Mesh(np.asarray(cpu_devices[:n]), ("x",)), data.xs[-1]
    grad = lambda fn: jax.grad(lambda a: (per_device(fn, mesh, split, concat, tiled)(a) * data.ct).sum())(x)
    np.testing.assert_array_equal(grad(pallas), grad(jax.lax.all_to_all))


def test_pallas_all_to_all_serves_as_ep_transport(data, cpu_devices):
    """Skewed routing, one row per peer per round slot, so several rounds; forward and backward must give exactly
    what lax.all_to_all gives."""
    ep, mesh = data.ep, build_mesh({"data": 2, "expert": 4}, cpu_devices)

    def run(transport):
        def loss(x, weights, *w):
            options = ExchangeOptions(capacity_factor=1.0, block_multiple=1, all_to_all=transport)
            out, stats = expert_parallel_ffn(x, ep.experts, weights, w, expert_ffn=SWIGLU, mesh=mesh, options=options)
            return (out * ep.ct).sum(), (out, stats)
        return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3, 4), has_aux=True))(ep.x, ep.weights, *ep.w)

    (_, (out, stats)), grads = run(pallas)
    (_, (out_ref, _)), grads_ref = run(None)
    assert int(stats.rounds.max()) > 1, f"the skewed routing took {int(stats.rounds.max())} round"
    assert int(stats.dropped_rows.sum()) == 0, f"{int(stats.dropped_rows.sum())} rows dropped"
    np.testing.assert_array_equal(out, out_ref, err_msg="output")
    for name, g, r in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, grads_ref, strict=True):
        np.testing.assert_array_equal(g, r, err_msg=f"d{name}")


def test_transport_callable_only_for_the_all_to_all_impl():
    x, e = jnp.zeros((4, 8)), jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(ValueError, match="expert_parallel.all_to_all .* not impl='ragged'"):
        expert_parallel_ffn_local(x, e, e.astype(jnp.float32), (jnp.zeros((2, 8, 4)), jnp.zeros((2, 8, 4)),
                                  jnp.zeros((2, 4, 8))), expert_ffn=SWIGLU, expert_axis="expert",
                                  options=ExchangeOptions(impl="ragged", all_to_all=all_to_all))


def test_compiled_for_tpus_the_estimate_prices_it_as_an_all_to_all():
    """On 4 compile-only v5e chips: one kernel, no XLA all-to-all, and experiments.estimate counts 3 of its 4 blocks
    as all-to-all bytes sent (it used to see only the kernel's HBM traffic)."""
    from jax.sharding import NamedSharding

    from experiments.estimate import estimate
    from sharding import targets

    mesh = Mesh(np.asarray(targets.devices("v5e:2x2")), ("x",))
    shape = (4, 64, 256)
    arg = jax.ShapeDtypeStruct((4 * shape[0], *shape[1:]), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
    compiled = per_device(all_to_all, mesh, 0, 0, False).lower(arg).compile()
    text = compiled.as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 1 and "all-to-all(" not in text
    e = estimate(compiled)
    assert e.bytes_all_to_all == np.prod(shape) * 2 * 3 / 4 and e.sync_collectives == 1, e
