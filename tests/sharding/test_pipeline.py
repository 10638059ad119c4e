"""Pipeline execution: loss and gradients of every schedule equal the single-device ones, on 8 simulated CPU devices."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sharding.pipeline import (ACTIVATION, BRANCH, COTANGENT, LEFT_KIND, NO_MESSAGE, RIGHT_KIND, SEND, TO_LEFT,
                               TO_RIGHT, compile_plan)
from sharding.pipeline_schedules import make_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("name, pp, m, n_act", [("gpipe", 4, 8, 8), ("1f1b", 4, 8, 4), ("1f1b", 4, 16, 4),
                                                ("1f1b", 8, 16, 8), ("dualpipe", 4, 8, 6), ("dualpipe", 8, 24, 10)])
def test_plan_pools_and_messages(name, pp, m, n_act):
    plan = compile_plan(make_schedule(name, pp, m))
    rows = plan.rows_by_tick
    assert plan.n_act == n_act   # 1F1B holds PP stage inputs, GPipe M, DualPipe PP+2 (counting ones in flight)
    sends_right, sends_left = rows[:-1, :, SEND] == TO_RIGHT, rows[1:, :, SEND] == TO_LEFT
    assert np.array_equal(sends_right, rows[1:, :, LEFT_KIND] != NO_MESSAGE)
    assert np.array_equal(sends_left, rows[:-1, :, RIGHT_KIND] != NO_MESSAGE)
    assert rows[0, :, LEFT_KIND].max() == rows[-1, :, RIGHT_KIND].max() == NO_MESSAGE
    n_messages = np.isin(rows[:, :, [LEFT_KIND, RIGHT_KIND]], [ACTIVATION, COTANGENT]).sum()
    assert n_messages == 2 * m * (pp - 1) and (rows[:, :, BRANCH] > 0).sum() == 2 * m * pp


PIPELINE_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from sharding.mesh import build_mesh
    from sharding.pipeline import pipeline_value_and_grad

    V, D, H, L, T = 16, 8, 12, 2, 3

    def stage_fn(p, x_BTD):            # L residual MLP layers per stage
        for layer in range(L):
            x_BTD = x_BTD + jnp.tanh(x_BTD @ p["w1"][layer]) @ p["w2"][layer]
        return x_BTD

    def embed_fn(p, tokens_BT):
        return p["embed"][tokens_BT]

    def head_loss_fn(p, x_BTD, targets_BT):
        logp_BTV = jax.nn.log_softmax(x_BTD @ p["head"])
        return -jnp.mean(jnp.take_along_axis(logp_BTV, targets_BT[..., None], -1))

    def sequential_loss(stage_params, first, last, tokens_MBT, targets_MBT, loss_fn=head_loss_fn):
        def one(tokens_BT, targets_BT):
            x_BTD = embed_fn(first, tokens_BT) if first else tokens_BT
            for s in range(stage_params["w1"].shape[0]):
                x_BTD = stage_fn(jax.tree.map(lambda a: a[s], stage_params), x_BTD)
            return loss_fn(last, x_BTD, targets_BT)
        return jnp.mean(jax.vmap(one)(tokens_MBT, targets_MBT))

    def check(got, want):
        np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    rng = np.random.default_rng(0)
    for sizes, M, B in [(dict(pipeline=4, data=2), 8, 4), (dict(pipeline=2, data=2, tensor=2), 4, 2)]:
        mesh, PP = build_mesh(sizes), sizes["pipeline"]
        stage_params = {"w1": rng.normal(0, 0.3, (PP, L, D, H)).astype(np.float32),
                        "w2": rng.normal(0, 0.3, (PP, L, H, D)).astype(np.float32)}
        first = {"embed": rng.normal(0, 1, (V, D)).astype(np.float32)}
        last = {"head": rng.normal(0, 0.3, (D, V)).astype(np.float32)}
        tokens, targets = rng.integers(0, V, (2, M, B, T)).astype(np.int32)
        want = jax.jit(jax.value_and_grad(sequential_loss, argnums=(0, 1, 2)))(stage_params, first, last, tokens,
                                                                               targets)
        for name in ("gpipe", "1f1b", "dualpipe"):
            step = pipeline_value_and_grad(stage_fn, head_loss_fn, mesh, name, M, first_fn=embed_fn)
            loss, grads = step(stage_params, first, last, tokens, targets)
            assert grads[0]["w1"].sharding.spec[0] == "pipeline"
            check((loss, grads), want)
            print(sizes, name, "ok")

    # A stage leaf split over a batch axis too (w2's D over `data`): stage_fn gathers it, and the gather's transpose
    # brings every shard's contribution to the owner, so its gradient is only averaged over the other batch shards.
    gathering_fn = lambda p, x_BTD: stage_fn(dict(p, w2=jax.lax.all_gather(p["w2"], "data", axis=2, tiled=True)),
                                             x_BTD)
    specs = {"w1": P("pipeline"), "w2": P("pipeline", None, None, "data")}
    step = pipeline_value_and_grad(gathering_fn, head_loss_fn, mesh, "1f1b", M, first_fn=embed_fn,
                                   stage_param_specs=specs)
    loss, grads = step(stage_params, first, last, tokens, targets)
    assert grads[0]["w2"].sharding.spec[:4] == ("pipeline", None, None, "data"), grads[0]["w2"].sharding
    check((loss, grads), want)
    print("split stage leaf ok")

    # Side inputs, a pytree activation (hidden state, running penalty) and aux outputs, on the last mesh (PP=2):
    # every stage scales its rows by side["scale"] and adds a penalty; stats (positive entries per stage) and
    # metrics (rows seen) come back summed over micro-batches and batch shards.
    def stage_aux(p, carried, side):
        x_BTD, penalty = carried
        x_BTD = stage_fn(p, x_BTD) * side["scale"][:, None, None]
        return (x_BTD, penalty + jnp.mean(x_BTD ** 2)), jnp.sum(x_BTD > 0, dtype=jnp.float32)

    def loss_aux(p, carried, targets_BT, side):
        x_BTD, penalty = carried
        return head_loss_fn(p, x_BTD, targets_BT) + 0.1 * penalty, {"rows": jnp.float32(x_BTD.shape[0])}

    def sequential_aux(stage_params, first, last, tokens_MBT, targets_MBT, scale_MB):
        def one(tokens_BT, targets_BT, scale_B):
            carried = (embed_fn(first, tokens_BT), 0.0)
            counts = []
            for s in range(stage_params["w1"].shape[0]):
                carried, count = stage_aux(jax.tree.map(lambda a: a[s], stage_params), carried, {"scale": scale_B})
                counts.append(count)
            return loss_aux(last, carried, targets_BT, None)[0], jnp.stack(counts)
        losses, counts = jax.vmap(one)(tokens_MBT, targets_MBT, scale_MB)
        return jnp.mean(losses), counts.sum(0)

    scale = rng.uniform(0.5, 1.5, (M, B)).astype(np.float32)
    (want_loss, want_counts), want_grads = jax.value_and_grad(sequential_aux, argnums=(0, 1, 2), has_aux=True)(
        stage_params, first, last, tokens, targets, scale)
    for name in ("1f1b", "dualpipe"):
        step = pipeline_value_and_grad(stage_aux, loss_aux, mesh, name, M, has_aux=True,
                                       first_fn=lambda p, tokens_BT, side: (embed_fn(p, tokens_BT), jnp.zeros(())))
        (loss, (counts, metrics)), grads = step(stage_params, first, last, tokens, targets, {"scale": scale})
        check((loss, grads), (want_loss, want_grads))
        np.testing.assert_array_equal(counts, want_counts)
        assert float(metrics["rows"]) == M * B and counts.sharding.spec[0] == "pipeline"
        print("side and aux", name, "ok")

    # No embedding or head: inputs are the activations, loss_fn gets () for its parameters.
    x_MBTD = rng.normal(0, 1, (4, 2, T, D)).astype(np.float32)
    mse = lambda _, x_BTD, y_BTD: jnp.mean((x_BTD - y_BTD) ** 2)
    want = jax.value_and_grad(sequential_loss, argnums=(0, 1, 2))(stage_params, (), (), x_MBTD, x_MBTD, mse)
    check(pipeline_value_and_grad(stage_fn, mse, mesh, "1f1b", 4)(stage_params, (), (), x_MBTD, x_MBTD), want)

    # Sizes that do not fit: one-line errors.
    mesh = build_mesh(dict(pipeline=4, data=2))
    stage_params_4 = jax.tree.map(lambda a: np.concatenate([a, a]), stage_params)
    for make in (lambda: pipeline_value_and_grad(stage_fn, mse, mesh, "dualpipe", 6),
                 lambda: pipeline_value_and_grad(stage_fn, mse, mesh, "1f1b", 8)(
                     stage_params_4, (), (), x_MBTD, x_MBTD),
                 lambda: pipeline_value_and_grad(stage_fn, mse, mesh, "1f1b", 4)(
                     stage_params, (), (), x_MBTD, x_MBTD),
                 lambda: pipeline_value_and_grad(stage_fn, mse, mesh, "1f1b", 4)(
                     stage_params_4, (), (), x_MBTD[:, :1], x_MBTD[:, :1]),
                 lambda: pipeline_value_and_grad(stage_fn, mse, mesh, "1f1b", 4,
                                                 stage_param_specs={"w1": P(None, "pipeline"), "w2": P("pipeline")})(
                     stage_params_4, (), (), x_MBTD, x_MBTD)):
        try:
            make()
        except ValueError as error:
            assert "\\n" not in str(error), str(error)
            print("error:", error)
        else:
            raise AssertionError("no error")
    print("ok")
""")


def test_pipeline_schedules_match_single_device_value_and_grad():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", PIPELINE_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr[-3000:]
    assert result.stdout.count(" ok\n") == 9 and result.stdout.count("error:") == 5, result.stdout
    for message in ("dualpipe: needs an even number of micro-batches ≥ 2·PP = 8, got 6",
                    "pipeline: inputs leaf of shape (4, 2, 3, 8) needs leading axis 8",
                    "pipeline: stage_params leaf of shape (2, 2, 8, 12) needs leading axis 4",
                    "pipeline: micro-batch of shape (1, 3, 8) does not split over 2 batch shards (",
                    "pipeline: stage_param_specs entry (None, 'pipeline') must start with 'pipeline'"):
        assert "error: " + message in result.stdout, result.stdout
