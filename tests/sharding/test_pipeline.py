"""Pipeline execution: loss and gradients of every schedule equal the single-device ones, on 8 simulated CPU devices."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sharding.mesh import build_mesh
from sharding.pipeline import (ACT_SEND, ACTIVATION, B_CHUNK, B_MICRO, B_RES_SLOT, BRANCH, COT_SEND, COTANGENT,
                               F_CHUNK, F_MICRO, F_RES_SLOT, IN_ACT_LEFT, IN_ACT_RIGHT, IN_COT_LEFT, IN_COT_RIGHT,
                               TO_LEFT, TO_RIGHT, compile_plan, pipeline_value_and_grad)
from sharding.pipeline_schedules import make_schedule
from tests.fast_compile import cheap_compiles, cpu_devices  # noqa: F401  (fixtures; cheap_compiles is autouse)


@pytest.mark.parametrize("name, pp, m, fuse, n_act, n_ticks", [
    ("gpipe", 4, 8, False, 8, 22), ("1f1b", 4, 8, False, 4, 22), ("1f1b", 4, 16, False, 4, 38),
    ("1f1b", 8, 16, False, 8, 46), ("dualpipe", 4, 8, False, 6, 18), ("dualpipe", 8, 24, False, 10, 54),
    ("dualpipe", 4, 8, True, 5, 14), ("dualpipe", 8, 24, True, 9, 38)])
def test_plan_pools_and_messages(name, pp, m, fuse, n_act, n_ticks):
    """Pools as small as the schedule allows (1F1B: PP stage inputs, GPipe: M, DualPipe: PP + 2, or PP + 1 with
    fused pairs, counting ones in flight), every message leaving one device arriving at its neighbour's matching
    channel, and with `fuse_pairs` DualPipe's overlapped pairs each in one tick (14 ticks for PP = 4, M = 8, where
    they take 18 as two ticks and 1F1B 2·(M + PP − 1) = 22)."""
    plan = compile_plan(make_schedule(name, pp, m), fuse)
    rows = plan.rows_by_tick
    assert (plan.n_act, rows.shape[1]) == (n_act, n_ticks)
    for send, kind, arrive_left, arrive_right in ((ACT_SEND, ACTIVATION, IN_ACT_LEFT, IN_ACT_RIGHT),
                                                  (COT_SEND, COTANGENT, IN_COT_LEFT, IN_COT_RIGHT)):
        assert np.array_equal(rows[:-1, :, send] == TO_RIGHT, rows[1:, :, arrive_left] > 0), kind
        assert np.array_equal(rows[1:, :, send] == TO_LEFT, rows[:-1, :, arrive_right] > 0), kind
        assert rows[0, :, arrive_left].max() == rows[-1, :, arrive_right].max() == 0, kind
    n_messages = (rows[:, :, [IN_ACT_LEFT, IN_COT_LEFT, IN_ACT_RIGHT, IN_COT_RIGHT]] > 0).sum()
    assert n_messages == 2 * m * (pp - 1)
    roles = [(None, None), *plan.branches]   # per branch id: (forward role, backward role)
    actions = sum((roles[b][0] is not None) + (roles[b][1] is not None) for b in rows[:, :, BRANCH].flat)
    pairs = sum(None not in roles[b] for b in rows[:, :, BRANCH].flat)
    assert actions == 2 * m * pp and (pairs > 0) == (name == "dualpipe" and fuse), (actions, pairs)


@pytest.mark.parametrize("name, fuse", [("1f1b", False), ("dualpipe", False), ("dualpipe", True)])
def test_plan_without_recompute_keeps_residuals_from_forward_to_backward(name, fuse):
    """Without recompute a stage input is released by its forward, and every forward's residuals hold a slot of
    its role's pool until its backward: the slot a backward reads is the one its forward wrote, no other forward
    writes it in between (nor in the backward's own tick, where the forward runs first), and the pools are no
    larger than the micro-batches in flight between F and B (1F1B: PP on the first stage)."""
    pp, m = 4, 8
    schedule = make_schedule(name, pp, m)
    plan = compile_plan(schedule, fuse, recompute=False)
    rows = plan.rows_by_tick
    kept = compile_plan(schedule, fuse)
    assert plan.n_act < kept.n_act and plan.res_roles and len(plan.n_res) == len(plan.res_roles)
    roles = [(None, None), *plan.branches]
    for device in range(pp):
        held = {}   # (role, slot) -> micro-batch and chunk whose residuals it holds
        for tick in range(rows.shape[1]):
            row = rows[device, tick]
            forward_role, backward_role = roles[row[BRANCH]]
            if backward_role is not None:
                key = (backward_role, row[B_RES_SLOT])
                assert held.pop(key) == (row[B_MICRO], row[B_CHUNK]), (device, tick)
            if forward_role is not None:
                key = (forward_role, row[F_RES_SLOT])
                assert key not in held and row[F_RES_SLOT] < plan.n_res[plan.res_roles.index(forward_role)]
                held[key] = (row[F_MICRO], row[F_CHUNK])
        assert not held
    if name == "1f1b":
        assert max(plan.n_res) == pp


def test_kept_residuals_run_each_forward_once(problems):
    """The backward from kept residuals multiplies nothing of the forward again: fewer matmuls in the program."""
    p = problems[LAST]

    def dots(recompute):
        step = pipeline_value_and_grad(stage_fn, head_loss_fn, p.mesh, "1f1b", p.M, first_fn=embed_fn,
                                       recompute=recompute)
        text = step.lower(p.stage_params, p.first, p.last, p.tokens, p.targets).compile().as_text()
        return text.count(" dot(")
    assert dots(False) < dots(True)


V, D, H, L, T = 16, 8, 12, 2, 3   # vocabulary, model width, hidden width, layers per stage, tokens per row
MESHES = {"pipeline4-data2": (dict(pipeline=4, data=2), 8, 4),              # (axis sizes, micro-batches M, rows B)
          "pipeline2-data2-tensor2": (dict(pipeline=2, data=2, tensor=2), 4, 2)}
LAST = "pipeline2-data2-tensor2"   # the mesh (and problem) of the tests after the schedules'


def stage_fn(p, x_BTD):            # L residual MLP layers per stage
    for layer in range(L):
        x_BTD = x_BTD + jnp.tanh(x_BTD @ p["w1"][layer]) @ p["w2"][layer]
    return x_BTD


def embed_fn(p, tokens_BT):
    return p["embed"][tokens_BT]


def head_loss_fn(p, x_BTD, targets_BT):
    logp_BTV = jax.nn.log_softmax(x_BTD @ p["head"])
    return -jnp.mean(jnp.take_along_axis(logp_BTV, targets_BT[..., None], -1))


def mse(_, x_BTD, y_BTD):
    return jnp.mean((x_BTD - y_BTD) ** 2)


def sequential_loss(stage_params, first, last, tokens_MBT, targets_MBT, loss_fn=head_loss_fn):
    def one(tokens_BT, targets_BT):
        x_BTD = embed_fn(first, tokens_BT) if first else tokens_BT
        for s in range(stage_params["w1"].shape[0]):
            x_BTD = stage_fn(jax.tree.map(lambda a: a[s], stage_params), x_BTD)
        return loss_fn(last, x_BTD, targets_BT)
    return jnp.mean(jax.vmap(one)(tokens_MBT, targets_MBT))


def check(got, want, where):
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5, err_msg=f"loss on {where}")
    got_leaves = jax.tree.leaves(got[1])
    want_leaves = jax.tree_util.tree_leaves_with_path(want[1])
    assert len(got_leaves) == len(want_leaves), f"{len(got_leaves)} gradients on {where}, {len(want_leaves)} wanted"
    for a, (path, b) in zip(got_leaves, want_leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                                   err_msg=f"gradient {jax.tree_util.keystr(path)} on {where}")


@pytest.fixture(scope="module")
def problems(cpu_devices):
    """Per mesh: PP stages' parameters, embedding and head, M micro-batches of B rows, and the sequential loss and
    gradients; then the side input `scale` and head-less inputs x_MBTD for the last mesh (drawn in this order)."""
    rng = np.random.default_rng(0)
    problems = {}
    for key, (sizes, m, b) in MESHES.items():
        pp = sizes["pipeline"]
        stage_params = {"w1": rng.normal(0, 0.3, (pp, L, D, H)).astype(np.float32),
                        "w2": rng.normal(0, 0.3, (pp, L, H, D)).astype(np.float32)}
        first = {"embed": rng.normal(0, 1, (V, D)).astype(np.float32)}
        last = {"head": rng.normal(0, 0.3, (D, V)).astype(np.float32)}
        tokens, targets = rng.integers(0, V, (2, m, b, T)).astype(np.int32)
        want = jax.jit(jax.value_and_grad(sequential_loss, argnums=(0, 1, 2)))(stage_params, first, last, tokens,
                                                                               targets)
        problems[key] = SimpleNamespace(mesh=build_mesh(sizes, cpu_devices), M=m, B=b, stage_params=stage_params,
                                        first=first, last=last, tokens=tokens, targets=targets, want=want)
    last_problem = problems[LAST]
    last_problem.scale = rng.uniform(0.5, 1.5, (last_problem.M, last_problem.B)).astype(np.float32)
    last_problem.x_MBTD = rng.normal(0, 1, (4, 2, T, D)).astype(np.float32)
    return problems


@pytest.mark.parametrize("name, fuse, recompute", [
    ("gpipe", False, True), ("1f1b", False, True), ("dualpipe", False, True), ("dualpipe", True, True),
    ("1f1b", False, False), ("dualpipe", False, False), ("dualpipe", True, False)],
    ids=["gpipe", "1f1b", "dualpipe", "dualpipe-fused-pairs", "1f1b-kept", "dualpipe-kept", "dualpipe-fused-kept"])
@pytest.mark.parametrize("mesh_key", list(MESHES))
def test_schedule_matches_single_device_value_and_grad(problems, mesh_key, name, fuse, recompute):
    """Every schedule, with each backward recomputing its stage or using the residuals its forward kept."""
    p = problems[mesh_key]
    step = pipeline_value_and_grad(stage_fn, head_loss_fn, p.mesh, name, p.M, first_fn=embed_fn, fuse_pairs=fuse,
                                   recompute=recompute)
    loss, grads = step(p.stage_params, p.first, p.last, p.tokens, p.targets)
    assert grads[0]["w1"].sharding.spec[0] == "pipeline", \
        f"w1's gradient {grads[0]['w1'].sharding.spec} on {mesh_key} {name}: stage axis not over `pipeline`"
    check((loss, grads), p.want, f"{mesh_key} {name}")


def test_stage_leaf_split_over_a_batch_axis(problems):
    """A stage leaf split over a batch axis too (w2's D over `data`): stage_fn gathers it, and the gather's transpose
    brings every shard's contribution to the owner, so its gradient is only averaged over the other batch shards."""
    p = problems[LAST]
    gathering_fn = lambda q, x_BTD: stage_fn(dict(q, w2=jax.lax.all_gather(q["w2"], "data", axis=2, tiled=True)),
                                             x_BTD)
    specs = {"w1": P("pipeline"), "w2": P("pipeline", None, None, "data")}
    step = pipeline_value_and_grad(gathering_fn, head_loss_fn, p.mesh, "1f1b", p.M, first_fn=embed_fn,
                                   stage_param_specs=specs)
    loss, grads = step(p.stage_params, p.first, p.last, p.tokens, p.targets)
    assert grads[0]["w2"].sharding.spec[:4] == ("pipeline", None, None, "data"), grads[0]["w2"].sharding
    check((loss, grads), p.want, f"{LAST} 1f1b, w2 split over data")


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


@pytest.fixture(scope="module")
def aux_want(problems):
    p = problems[LAST]
    return jax.value_and_grad(sequential_aux, argnums=(0, 1, 2), has_aux=True)(
        p.stage_params, p.first, p.last, p.tokens, p.targets, p.scale)


@pytest.mark.parametrize("name", ["1f1b", "dualpipe"])
def test_side_inputs_pytree_activation_and_aux_outputs(problems, aux_want, name):
    """Side inputs, a pytree activation (hidden state, running penalty) and aux outputs, on the last mesh (PP=2):
    every stage scales its rows by side["scale"] and adds a penalty; stats (positive entries per stage) and metrics
    (rows seen) come back summed over micro-batches and batch shards."""
    p, ((want_loss, want_counts), want_grads) = problems[LAST], aux_want
    step = pipeline_value_and_grad(stage_aux, loss_aux, p.mesh, name, p.M, has_aux=True,
                                   first_fn=lambda q, tokens_BT, side: (embed_fn(q, tokens_BT), jnp.zeros(())))
    (loss, (counts, metrics)), grads = step(p.stage_params, p.first, p.last, p.tokens, p.targets, {"scale": p.scale})
    check((loss, grads), (want_loss, want_grads), f"{LAST} {name} with side inputs and aux outputs")
    np.testing.assert_array_equal(counts, want_counts, err_msg=f"stage stats of {name}")
    assert float(metrics["rows"]) == p.M * p.B, f"metrics['rows'] = {float(metrics['rows'])}, not {p.M * p.B}"
    assert counts.sharding.spec[0] == "pipeline", f"stage stats {counts.sharding.spec}: not over `pipeline`"


def test_no_embedding_or_head(problems):
    """Inputs are the activations, loss_fn gets () for its parameters."""
    p = problems[LAST]
    want = jax.value_and_grad(sequential_loss, argnums=(0, 1, 2))(p.stage_params, (), (), p.x_MBTD, p.x_MBTD, mse)
    got = pipeline_value_and_grad(stage_fn, mse, p.mesh, "1f1b", 4)(p.stage_params, (), (), p.x_MBTD, p.x_MBTD)
    check(got, want, f"{LAST} 1f1b without embedding or head")


def stages_4(p):   # the last problem's 2 stages, twice: 4
    return {key: np.concatenate([a, a]) for key, a in p.stage_params.items()}


pvg = pipeline_value_and_grad
# (a call on pipeline=4 × data=2 and the last problem, the one-line ValueError it raises)
DOES_NOT_FIT = [
    pytest.param(lambda mesh, p: pvg(stage_fn, mse, mesh, "dualpipe", 6),
                 "dualpipe: needs an even number of micro-batches ≥ 2·PP = 8, got 6", id="dualpipe-6-micro-batches"),
    pytest.param(lambda mesh, p: pvg(stage_fn, mse, mesh, "1f1b", 8)(stages_4(p), (), (), p.x_MBTD, p.x_MBTD),
                 "pipeline: inputs leaf of shape (4, 2, 3, 8) needs leading axis 8", id="inputs-not-M"),
    pytest.param(lambda mesh, p: pvg(stage_fn, mse, mesh, "1f1b", 4)(p.stage_params, (), (), p.x_MBTD, p.x_MBTD),
                 "pipeline: stage_params leaf of shape (2, 2, 8, 12) needs leading axis 4", id="stages-not-PP"),
    pytest.param(lambda mesh, p: pvg(stage_fn, mse, mesh, "1f1b", 4)(stages_4(p), (), (), p.x_MBTD[:, :1],
                                                                     p.x_MBTD[:, :1]),
                 "pipeline: micro-batch of shape (1, 3, 8) does not split over 2 batch shards (", id="rows-not-split"),
    pytest.param(lambda mesh, p: pvg(stage_fn, mse, mesh, "1f1b", 4,
                                     stage_param_specs={"w1": P(None, "pipeline"), "w2": P("pipeline")})(
                     stages_4(p), (), (), p.x_MBTD, p.x_MBTD),
                 "pipeline: stage_param_specs entry (None, 'pipeline') must start with 'pipeline'",
                 id="spec-not-pipeline-first"),
]


@pytest.mark.parametrize("make, message", DOES_NOT_FIT)
def test_sizes_that_do_not_fit_fail_in_one_line(problems, cpu_devices, make, message):
    with pytest.raises(ValueError) as error:
        make(build_mesh(dict(pipeline=4, data=2), cpu_devices), problems[LAST])
    assert message in str(error.value), f"{str(error.value)!r} does not say {message!r}"
    assert "\n" not in str(error.value), str(error.value)
