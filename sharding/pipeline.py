"""Pipeline-parallel loss and gradients: a schedule's tick table executed with `jax.shard_map` over "pipeline", the
backward written out per tick (recompute, then vjp) so that the schedule decides the order of work.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from sharding.mesh import BATCH_AXES
from sharding.pipeline_schedules import Action, Schedule, make_schedule, tick_table

PyTree = Any

# Columns of the per-device, per-tick plan: the tick's forward (F_*) and backward (B_*), either absent, the directions
# their outputs travel (0: nowhere), and the pool slot + 1 (0: none) of each message arriving from either side.
# RES_SLOT: without recompute, the slot of the forward's saved residuals (its backward reads the same slot).
(BRANCH, F_CHUNK, F_MICRO, F_ACT_SLOT, B_CHUNK, B_MICRO, B_ACT_SLOT, B_COT_SLOT, ACT_SEND, COT_SEND,
 IN_ACT_LEFT, IN_COT_LEFT, IN_ACT_RIGHT, IN_COT_RIGHT, F_RES_SLOT, B_RES_SLOT) = range(16)
N_COLUMNS = 16
TO_RIGHT, TO_LEFT = 1, 2
ACTIVATION, COTANGENT = "act", "cot"
_IN_COLUMN = {(ACTIVATION, TO_RIGHT): IN_ACT_LEFT, (COTANGENT, TO_RIGHT): IN_COT_LEFT,   # sent right: arrives from
              (ACTIVATION, TO_LEFT): IN_ACT_RIGHT, (COTANGENT, TO_LEFT): IN_COT_RIGHT}   # the receiver's left

# (first stage?, last stage?, the stage's variant) of an action: what else it runs (embedding, head and loss), and
# which program of the stage body (pipeline_value_and_grad's stage_variants; None: the one program).
Role = tuple[bool, bool, Any]


@dataclass(frozen=True)
class Plan:
    """A schedule compiled to integers: `rows_by_tick[rank, tick]` holds the columns above (int32 [P, ticks, 16]).

    `branches[i]` is the (forward role, backward role) of branch i+1 (branch 0 idles; None: no such action), so an
    overlapped pair's forward and backward run in one branch, one program that XLA can schedule together. Saved
    stage inputs and received cotangents live in per-device pools of `n_act` and `n_cot` slots, reused once their
    backward has run. `channels` are the ppermutes a tick makes, (direction, message kinds): one per direction the
    schedule sends in, carrying both kinds where no device ever sends both that way in one tick (fused pairs do).
    Without `recompute`, a stage input is released once its forward has run, and each forward's residuals (what its
    backward needs) wait in a pool per role, `n_res[i]` slots for the role `res_roles[i]`, until that backward.
    """
    schedule: Schedule
    rows_by_tick: np.ndarray
    branches: tuple[tuple[Role | None, Role | None], ...]
    n_act: int
    n_cot: int
    channels: tuple[tuple[int, tuple[str, ...]], ...]
    stage_variants: tuple | None = None
    recompute: bool = True
    res_roles: tuple[Role, ...] = ()
    n_res: tuple[int, ...] = ()


def _role(action: Action | None, n_stages: int, variants: tuple | None) -> Role | None:
    if action is None:
        return None
    return action.stage == 0, action.stage == n_stages - 1, None if variants is None else variants[action.stage]


def split_pairs(schedule: Schedule) -> Schedule:
    """`schedule` with every overlapped pair run as its forward, then its backward, one tick each."""
    programs = tuple(tuple((a,) for slot in program for a in sorted(slot, key=lambda a: a.kind != "F"))
                     for program in schedule.programs)
    return dataclasses.replace(schedule, programs=programs)


@functools.lru_cache(maxsize=16)
def compile_plan(schedule: Schedule, fuse_pairs: bool = False, stage_variants: tuple | None = None,
                 recompute: bool = True) -> Plan:
    """Ticks, pool slots and messages for every action of `schedule`. `fuse_pairs`: an overlapped pair's forward
    and backward run in one tick as one program (fewer lockstep ticks, both halves' buffers at once: DeepSeek-V3 671B
    on 2048 H100s then needs 197 GiB a device against 66); else the forward, then the backward. `stage_variants`:
    per stage, the variant of the body it runs (part of each branch's key). `recompute`: a backward recomputes its
    stage's forward from the saved input (else the forward's residuals are kept: see Plan). Cached: the executor
    and whoever prices its ticks (dsv3_jax.train.build.TrainStep.tick_branches) share one plan."""
    if stage_variants is not None and len(stage_variants) != schedule.n_stages:
        raise ValueError(f"pipeline: {len(stage_variants)} stage_variants for {schedule.n_stages} stages")
    if not fuse_pairs:
        schedule = split_pairs(schedule)
    table = tick_table(schedule)
    n_devices, n_stages, n_ticks = schedule.n_devices, schedule.n_stages, len(table[0])
    when = {action: (device, tick) for device, row in enumerate(table) for tick, slot in enumerate(row)
            for action in slot}

    # An activation of (m, s) is held on its device from the tick F(m, s−1) sends it until B(m, s) has run (without
    # recompute: F(m, s)); a cotangent of (m, s) from the tick B(m, s+1) sends it until B(m, s). Without recompute
    # the residuals of F(m, s) are held from that tick until B(m, s), in their role's pool (a slot freed by a tick's
    # backward is not reused by that tick's forward, which runs first).
    act_slot, cot_slot, n_act, n_cot = {}, {}, 1, 1
    role_of = lambda a: _role(a, n_stages, stage_variants)
    res_roles = () if recompute else tuple(dict.fromkeys(role_of(a) for a in when if a.kind == "F"))
    res_slot, n_res = {}, [1] * len(res_roles)
    used_by = lambda a: when[Action("B" if recompute else "F", a.micro, a.stage)][1]   # an input's last reader
    for device in range(n_devices):
        mine = [a for a in when if when[a][0] == device]
        slots, n = _allocate([(when[Action("F", a.micro, a.stage - 1)][1], used_by(a), a)
                              for a in mine if a.kind == "F" and a.stage > 0])
        act_slot, n_act = act_slot | slots, max(n_act, n)
        for i, role in enumerate(res_roles):
            slots, n = _allocate([(when[a][1], when[Action("B", a.micro, a.stage)][1], a) for a in mine
                                  if a.kind == "F" and role_of(a) == role], strict=True)
            res_slot, n_res[i] = res_slot | slots, max(n_res[i], n)
        slots, n = _allocate([(when[Action("B", a.micro, a.stage + 1)][1], when[a][1], a)
                              for a in mine if a.kind == "B" and a.stage < n_stages - 1])
        cot_slot, n_cot = cot_slot | slots, max(n_cot, n)

    branches: list[tuple[Role | None, Role | None]] = []
    channels: set[tuple[str, int]] = set()
    rows_by_tick = np.zeros((n_devices, n_ticks, N_COLUMNS), np.int32)
    for device, row in enumerate(table):
        for tick, slot in enumerate(row):
            if not slot:
                continue
            forward = [a for a in slot if a.kind == "F"]
            backward = [a for a in slot if a.kind == "B"]
            assert len(forward) <= 1 and len(backward) <= 1, slot
            forward, backward = (forward or [None])[0], (backward or [None])[0]
            key = (_role(forward, n_stages, stage_variants), _role(backward, n_stages, stage_variants))
            if key not in branches:
                branches.append(key)
            cols = rows_by_tick[device, tick]
            cols[BRANCH] = branches.index(key) + 1
            if forward is not None:
                m = forward.micro
                cols[F_CHUNK], cols[F_MICRO], cols[F_ACT_SLOT] = schedule.chunk_of(m), m, act_slot.get(forward, 0)
                cols[F_RES_SLOT] = res_slot.get(forward, 0)
            if backward is not None:
                m, s = backward.micro, backward.stage
                cols[B_CHUNK], cols[B_MICRO] = schedule.chunk_of(m), m
                cols[B_ACT_SLOT], cols[B_COT_SLOT] = act_slot.get(Action("F", m, s), 0), cot_slot.get(backward, 0)
                cols[B_RES_SLOT] = res_slot.get(Action("F", m, s), 0)
            for action in slot:
                m, s = action.micro, action.stage
                if action.kind == "F" and s < n_stages - 1:
                    kind, target, pool_slot = ACTIVATION, schedule.device_of(m, s + 1), act_slot[Action("F", m, s + 1)]
                elif action.kind == "B" and s > 0:
                    kind, target, pool_slot = COTANGENT, schedule.device_of(m, s - 1), cot_slot[Action("B", m, s - 1)]
                else:
                    continue
                assert abs(target - device) == 1, (action, device, target)
                direction = TO_RIGHT if target == device + 1 else TO_LEFT
                cols[ACT_SEND if kind == ACTIVATION else COT_SEND] = direction
                incoming = rows_by_tick[target, tick]
                assert incoming[_IN_COLUMN[kind, direction]] == 0, (action, tick)
                incoming[_IN_COLUMN[kind, direction]] = pool_slot + 1
                channels.add((kind, direction))
    return Plan(schedule, rows_by_tick, tuple(branches), n_act, n_cot, _channels(rows_by_tick, channels),
                stage_variants, recompute, res_roles, tuple(n_res))


def _channels(rows_by_tick: np.ndarray, used: set[tuple[str, int]]) -> tuple[tuple[int, tuple[str, ...]], ...]:
    """Per direction used, one channel for its message kinds, or one per kind where some tick sends both."""
    out = []
    for direction in (TO_RIGHT, TO_LEFT):
        kinds = tuple(kind for kind in (ACTIVATION, COTANGENT) if (kind, direction) in used)
        both = np.any((rows_by_tick[..., ACT_SEND] == direction) & (rows_by_tick[..., COT_SEND] == direction))
        out += [(direction, (kind,)) for kind in kinds] if both else ([(direction, kinds)] if kinds else [])
    return tuple(out)


def pipeline_value_and_grad(
    stage_fn: Callable[..., Any],
    loss_fn: Callable[..., Any],
    mesh: Mesh,
    schedule: str | Schedule,
    n_micro: int,
    *,
    first_fn: Callable[..., PyTree] | None = None,
    axis: str = "pipeline",
    has_aux: bool = False,
    stage_param_specs: PyTree | Callable[[PyTree], PyTree] | None = None,
    first_param_specs: PyTree | Callable[[PyTree], PyTree] | None = None,
    last_param_specs: PyTree | Callable[[PyTree], PyTree] | None = None,
    fuse_pairs: bool = False,
    stage_variants: Sequence[Hashable] | None = None,
    recompute: bool = True,
) -> Callable[..., Any]:
    """A jitted `step(stage_params, first_params, last_params, inputs, targets, side=None) -> (loss, grads)`,
    grads = (g_stage, g_first, g_last).

    The model, per micro-batch m, is
        x = first_fn(first_params, inputs[m]); x = stage_fn(stage_params[s], x) for s = 0..PP−1;
        loss_m = loss_fn(last_params, x, targets[m])
    and `loss` is the mean of loss_m over micro-batches (and data shards); the gradients are of that mean.
      stage_fn(params, x) -> x           the same-shaped body of every stage (it may loop over its own layers);
                                         `stage_params` leaves have a leading axis of size PP, split over `axis`.
      first_fn(first_params, inputs_m)   the embedding, run where stage 0 runs (default: inputs_m is x).
      loss_fn(last_params, x, targets_m) the head and loss, a scalar, run where stage PP−1 runs.
    The activation x may be a pytree (e.g. the hidden state and a running auxiliary loss).
    `first_params` and `last_params` are replicated by default (pass () when unused); their gradients come back
    with their specs.
    `inputs` and `targets` are pytrees of [n_micro, batch, ...] arrays; the batch dimension is split over the
    mesh's BATCH_AXES (sharding.mesh); the other axes (tensor) compute replicas. loss_fn should be a mean over
    the rows of its micro-batch, so that the mean over batch shards is the mean over the whole batch.
    `side`, when given, is a pytree like `inputs` (per-micro-batch data every stage needs: masks, position tables);
    then all three functions get the micro-batch's slice `side_m` as one more, last argument.
    With `has_aux`, stage_fn returns (x, stats) and loss_fn returns (loss, metrics), and the step returns
    ((loss, (stats, metrics)), grads): `stats` stacked per stage like stage_params, `metrics` replicated, both
    summed over micro-batches and batch shards (divide by n_micro · batch_shards(mesh)[1] for means). They are
    taken from the forwards; they carry no gradient.
    `stage_param_specs` (default: P(axis) for every leaf) gives per-leaf PartitionSpecs of `stage_params` (a tree
    like it, or a function of it returning one), each starting with `axis`; their gradients come back with the same
    specs. A leaf may be split over batch axes too (e.g. experts over `expert`): stage_fn then gets the local slice
    and must itself bring every shard's contribution to the slice's owner (as an exchange's transpose does), so its
    gradient is summed over the batch axes the leaf is not split over only (and divided by the batch shards).
    `first_param_specs` / `last_param_specs` (default: P() for every leaf) do the same for `first_params` /
    `last_params`, over batch axes only: first_fn / loss_fn get the local slices (and gather what they use whole).
    `schedule` is a name of SCHEDULE_NAMES or a Schedule. With `recompute`, a device saves each stage input until
    that micro-batch's backward, which recomputes the stage forward under `jax.vjp` (one extra forward per stage, no
    stored residuals); without, the forward runs under `jax.vjp` and its residuals wait for the backward (no forward
    runs twice; more memory: the activations the backward needs, for every micro-batch between its F and B).

    Each tick every device runs the forward and / or backward its table names (or idles), then neighbours swap their
    messages with `ppermute`: activations travel towards later stages, cotangents towards earlier ones. The backward
    is written out per tick, not derived by differentiating a forward pipeline, so the schedule decides the order of
    work and how many activations are held. `fuse_pairs` runs an overlapped pair (DualPipe) as one program in one
    tick (compile_plan), else as two ticks.
    `stage_variants` (one hashable per stage) makes stage_fn take a keyword `variant`, the static value of the stage
    it runs: stages that differ (one with fewer real layers) run their own program, in their own branches.
    """
    n_stages = mesh.shape[axis]
    if isinstance(schedule, str):
        schedule = make_schedule(schedule, n_stages, n_micro)
    if (schedule.n_devices, schedule.n_micro) != (n_stages, n_micro):
        raise ValueError(f"pipeline: schedule is for PP={schedule.n_devices}, M={schedule.n_micro}, "
                         f"not mesh.{axis}={n_stages}, n_micro={n_micro}")
    variants = None if stage_variants is None else tuple(stage_variants)
    plan = compile_plan(schedule, fuse_pairs, variants, recompute)
    batch_axes, n_batch_shards = batch_shards(mesh)
    batch_spec = P(None, batch_axes or None)

    def run(with_side, stage_params, first_params, last_params):
        fns = _uniform_fns(stage_fn, loss_fn, first_fn, has_aux, with_side, variants is not None)
        specs = (_param_specs(stage_param_specs, stage_params, axis),
                 _param_specs(first_param_specs, first_params, None),
                 _param_specs(last_param_specs, last_params, None))
        # Per leaf, the batch axes its gradient is summed over: those it is not split over.
        reduce_axes = [[tuple(a for a in batch_axes if a not in _spec_axes(spec))
                        for spec in jax.tree.leaves(tree, is_leaf=_is_spec)] for tree in specs]
        return jax.shard_map(
            lambda *args: _run_plan(plan, *fns, axis, batch_axes, n_batch_shards, reduce_axes, *args),
            mesh=mesh, in_specs=(*specs, batch_spec, batch_spec, batch_spec),
            out_specs=(P(), specs, (P(axis), P())), check_vma=False)

    @jax.jit
    def step(stage_params, first_params, last_params, inputs, targets, side=None):
        for name, tree, dim, size in (("stage_params", stage_params, 0, n_stages), ("inputs", inputs, 0, n_micro),
                                      ("targets", targets, 0, n_micro), ("side", side, 0, n_micro)):
            for leaf in jax.tree.leaves(tree):
                if leaf.ndim <= dim or leaf.shape[dim] != size:
                    raise ValueError(f"pipeline: {name} leaf of shape {leaf.shape} needs leading axis {size}")
        for leaf in jax.tree.leaves((inputs, targets, side)):
            if leaf.ndim < 2 or leaf.shape[1] % n_batch_shards:
                raise ValueError(f"pipeline: micro-batch of shape {leaf.shape[1:]} does not split over "
                                 f"{n_batch_shards} batch shards ({', '.join(batch_axes)})")
        loss, grads, aux = run(side is not None, stage_params, first_params, last_params)(
            stage_params, first_params, last_params, inputs, targets, side)
        return ((loss, aux), grads) if has_aux else (loss, grads)

    return step


def batch_shards(mesh: Mesh) -> tuple[tuple[str, ...], int]:
    """The mesh axes that split a micro-batch's rows (BATCH_AXES present in `mesh`), and how many shards they make."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return axes, int(np.prod([mesh.shape[a] for a in axes]))


def _is_spec(x) -> bool:
    return isinstance(x, P)


def _spec_axes(spec: P) -> set[str]:
    """Mesh axes named anywhere in a PartitionSpec."""
    axes = set()
    for entry in spec:
        axes.update(entry if isinstance(entry, tuple) else () if entry is None else (entry,))
    return axes


def _param_specs(param_specs, params, axis):
    """A PartitionSpec per leaf of `params` (structure checked): P(axis) / P() by default; each starts with `axis`
    when one is given, else names batch axes only."""
    if param_specs is None:
        return jax.tree.map(lambda _: P(axis) if axis else P(), params)
    specs = param_specs(params) if callable(param_specs) else param_specs
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    if treedef != jax.tree.structure(params) or not all(map(_is_spec, leaves)):
        raise ValueError(f"pipeline: param specs must be a PartitionSpec per leaf, like {jax.tree.structure(params)}")
    for spec in leaves:
        if axis and (not len(spec) or spec[0] != axis):
            raise ValueError(f"pipeline: stage_param_specs entry {tuple(spec)} must start with {axis!r}")
        if not axis and not _spec_axes(spec) <= set(BATCH_AXES):
            raise ValueError(f"pipeline: first/last param spec {tuple(spec)} may name batch axes only")
    return specs


def _sum_over_shards(tree, reduce_axes, n_batch_shards):
    """Gradients of leaves (per reduce_axes entry: the batch axes a leaf is not split over) summed over those axes
    and divided by the batch shards: a leaf split over a batch axis already holds every shard's contribution along
    it (see stage_param_specs)."""
    leaves, treedef = jax.tree.flatten(tree)
    for axes in dict.fromkeys(a for a in reduce_axes if a):
        which = [i for i, a in enumerate(reduce_axes) if a == axes]
        for i, g in zip(which, jax.lax.psum([leaves[i] for i in which], axes)):
            leaves[i] = g
    return treedef.unflatten([g / n_batch_shards for g in leaves])


def _uniform_fns(stage_fn, loss_fn, first_fn, has_aux, with_side, with_variants):
    """first(p, inputs_m, side_m) -> x, body(p, x, side_m, variant) -> (x, stats), head(p, x, targets_m, side_m) ->
    (loss, metrics), whatever the caller's functions take and return."""
    first_fn = first_fn or (lambda _, inputs, *side: inputs)
    side_of = (lambda side: (side,)) if with_side else (lambda side: ())
    first = lambda p, inputs, side: first_fn(p, inputs, *side_of(side))
    body = lambda p, x, side, variant: stage_fn(p, x, *side_of(side), **({"variant": variant} if with_variants else {}))
    head = lambda p, x, targets, side: loss_fn(p, x, targets, *side_of(side))
    if not has_aux:
        no_aux = lambda fn: lambda *args: (fn(*args), ())
        body, head = no_aux(body), no_aux(head)
    return first, body, head


def _run_plan(plan, first, body, head, axis, batch_axes, n_batch_shards, reduce_axes, stage_params, first_params,
              last_params, inputs, targets, side):
    """The per-device program: scan the device's plan rows, then reduce losses, gradients and aux outputs."""
    schedule = plan.schedule
    n_stages, n_micro = schedule.n_stages, schedule.n_micro
    reverse = [(d, n_stages - 1 - d) for d in range(n_stages)]
    chunks = stage_params    # leaves [n_chunks, ...]: chunk 1 is stage PP−1−d, fetched from the mirror device
    if schedule.bidirectional:
        chunks = jax.tree.map(lambda p: jnp.concatenate([p, jax.lax.ppermute(p, axis, reverse)]), stage_params)

    def micro(tree, m):
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, m, keepdims=False), tree)

    x_shape = jax.eval_shape(first, first_params, micro(inputs, 0), micro(side, 0))
    variant = None if plan.stage_variants is None else plan.stage_variants[0]   # every variant's stats: one shape
    stats_shape = jax.eval_shape(lambda p, x, side: body(p, x, side, variant), micro(chunks, 0), x_shape,
                                 micro(side, 0))[1]
    metrics_shape = jax.eval_shape(head, last_params, x_shape, micro(targets, 0), micro(side, 0))[1]
    zeros = lambda shapes, *lead: jax.tree.map(lambda s: jnp.zeros((*lead, *s.shape), s.dtype), shapes)
    zeros_like = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    carry = dict(act=zeros(x_shape, plan.n_act), cot=zeros(x_shape, plan.n_cot),
                 g_chunks=zeros_like(chunks), g_first=zeros_like(first_params), g_last=zeros_like(last_params),
                 loss=jnp.zeros((), jnp.float32), stats=zeros(stats_shape, schedule.n_chunks),
                 metrics=zeros(metrics_shape))

    def stage_at(m, is_first, is_last, variant):
        """One stage on micro-batch m, with the embedding / head and loss where it runs them."""
        side_m = micro(side, m)

        def stage(params, first_params, last_params, x):
            x = first(first_params, micro(inputs, m), side_m) if is_first else x
            x, stats = body(params, x, side_m, variant)
            if is_last:
                loss, metrics = head(last_params, x, micro(targets, m), side_m)
                return loss, (stats, metrics)
            return x, (stats, ())
        return stage

    def stage_vjp(c, m, role, saved):
        """The stage's forward under vjp: (out, (stats, metrics), pullback, the pullback's leaves, its treedef, and
        per leaf the index of the parameter leaf it is (-1: an activation residual))."""
        params = (micro(chunks, c), first_params, last_params)
        out, pullback, aux = jax.vjp(stage_at(m, *role), *params, saved, has_aux=True)
        leaves, treedef = jax.tree.flatten(pullback)
        param_leaves = jax.tree.leaves(params)
        index = tuple(next((k for k, p in enumerate(param_leaves) if p is leaf), -1) for leaf in leaves)
        return out, aux, pullback, leaves, treedef, index

    # Without recompute: per role, the pullback's structure (traced once here: it holds no tracers, so it serves
    # every branch) and the shapes of the residuals the pool keeps (parameters are read back, not kept).
    pullbacks, pools = {}, []
    for role, n_slots in zip(plan.res_roles, plan.n_res):
        def residuals(c, m, saved, role=role):
            out, _, _, leaves, treedef, index = stage_vjp(c, m, role, saved)
            pullbacks[role] = (treedef, index, jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype), out))
            return [leaf for leaf, k in zip(leaves, index) if k < 0]
        pools.append(zeros(jax.eval_shape(residuals, jnp.int32(0), jnp.int32(0), x_shape), n_slots))
    if pools:
        carry["res"] = tuple(pools)

    def forward(carry, row, is_first, is_last, variant):
        """The tick's forward (under vjp, its residuals kept, without recompute): (carry, the activation it sends
        on; zeros from the last stage)."""
        c, m, role = row[F_CHUNK], row[F_MICRO], (is_first, is_last, variant)
        saved = micro(carry["act"], row[F_ACT_SLOT])
        if plan.recompute:
            out, (stats, metrics) = stage_at(m, *role)(micro(chunks, c), first_params, last_params, saved)
        else:
            out, (stats, metrics), _, leaves, _, index = stage_vjp(c, m, role, saved)
            assert index == pullbacks[role][1], "pipeline: a stage's residuals differ between traces"
            i, slot = plan.res_roles.index(role), row[F_RES_SLOT]
            kept = [leaf for leaf, k in zip(leaves, index) if k < 0]
            pools = list(carry["res"])
            pools[i] = [pool.at[slot].set(leaf) for pool, leaf in zip(pools[i], kept)]
            carry["res"] = tuple(pools)
        carry["stats"] = jax.tree.map(lambda S, s: S.at[c].add(s), carry["stats"], stats)
        if is_last:
            carry["loss"] += out.astype(jnp.float32)
            carry["metrics"] = jax.tree.map(jnp.add, carry["metrics"], metrics)
            return carry, zeros_like(saved)
        return carry, out

    def backward(carry, row, is_first, is_last, variant):
        """The tick's backward (from the kept residuals, or the stage's forward recomputed under vjp): (carry, the
        input cotangent it sends)."""
        c, m, role = row[B_CHUNK], row[B_MICRO], (is_first, is_last, variant)
        if plan.recompute:
            out_shape, _, pullback, *_ = stage_vjp(c, m, role, micro(carry["act"], row[B_ACT_SLOT]))
        else:
            treedef, index, out_shape = pullbacks[role]
            kept = iter(micro(carry["res"][plan.res_roles.index(role)], row[B_RES_SLOT]))
            param_leaves = jax.tree.leaves((micro(chunks, c), first_params, last_params))
            pullback = jax.tree.unflatten(treedef, [param_leaves[k] if k >= 0 else next(kept) for k in index])
        seed = (jax.tree.map(lambda o: jnp.full(o.shape, 1 / n_micro, o.dtype), out_shape) if is_last
                else micro(carry["cot"], row[B_COT_SLOT]))
        g_params, g_first, g_last, g_x = pullback(seed)
        carry["g_chunks"] = jax.tree.map(lambda G, g: G.at[c].add(g), carry["g_chunks"], g_params)
        if is_first:
            carry["g_first"] = jax.tree.map(jnp.add, carry["g_first"], g_first)
        if is_last:
            carry["g_last"] = jax.tree.map(jnp.add, carry["g_last"], g_last)
        return carry, g_x

    def make_branch(forward_role, backward_role):
        """One program for the tick's forward and backward (an overlapped pair): they share no data, so XLA may
        run one's communication under the other's compute."""
        def branch(carry, row):
            carry, act_out, cot_out = dict(carry), zeros(x_shape), zeros(x_shape)
            if forward_role is not None:
                carry, act_out = forward(carry, row, *forward_role)
            if backward_role is not None:
                carry, cot_out = backward(carry, row, *backward_role)
            return carry, act_out, cot_out
        return branch

    branches = [lambda carry, row: (carry, zeros(x_shape), zeros(x_shape))]
    branches += [make_branch(*key) for key in plan.branches]
    pairs = {TO_RIGHT: [(d, d + 1) for d in range(n_stages - 1)], TO_LEFT: [(d + 1, d) for d in range(n_stages - 1)]}

    def tick(carry, row):
        carry, act_out, cot_out = jax.lax.switch(row[BRANCH], branches, carry, row)
        for direction, kinds in plan.channels:   # only the ppermutes the schedule needs
            payload = zeros(x_shape)
            for kind in kinds:
                out, send = (act_out, row[ACT_SEND]) if kind == ACTIVATION else (cot_out, row[COT_SEND])
                payload = jax.tree.map(lambda o, p: jnp.where(send == direction, o, p), out, payload)
            message = jax.lax.ppermute(payload, axis, pairs[direction])
            for kind in kinds:
                slot = row[_IN_COLUMN[kind, direction]]
                carry[kind] = jax.tree.map(lambda held, new: held.at[jnp.maximum(slot - 1, 0)].set(
                    jnp.where(slot > 0, new, held[jnp.maximum(slot - 1, 0)])), carry[kind], message)
        return carry, None

    my_rows_by_tick = jnp.asarray(plan.rows_by_tick)[jax.lax.axis_index(axis)]
    carry, _ = jax.lax.scan(tick, carry, my_rows_by_tick)

    g_stage, stats = carry["g_chunks"], carry["stats"]
    if schedule.bidirectional:   # chunk 1 ran stage PP−1−d: its gradient and stats go home and add to that device's
        go_home = lambda g: g[:1] + jax.lax.ppermute(g[1:], axis, reverse)
        g_stage, stats = jax.tree.map(go_home, g_stage), jax.tree.map(go_home, stats)
    loss = jax.lax.psum(carry["loss"] / n_micro, axis)
    g_first, g_last, metrics = jax.lax.psum((carry["g_first"], carry["g_last"], carry["metrics"]), axis)
    if batch_axes:
        loss = jax.lax.pmean(loss, batch_axes)
        g_stage, g_first, g_last = (_sum_over_shards(g, axes, n_batch_shards)
                                    for g, axes in zip((g_stage, g_first, g_last), reduce_axes))
        stats, metrics = jax.lax.psum((stats, metrics), batch_axes)
    return loss, (g_stage, g_first, g_last), (stats, metrics)


def _allocate(items: list[tuple[int, int, Action]], strict: bool = False) -> tuple[dict[Action, int], int]:
    """Pool slots for (arrive tick, release tick, action) items; a slot is free again after its release tick's work
    (`strict`: only from the tick after it)."""
    slot_of: dict[Action, int] = {}
    released: list[int] = []          # per slot, the tick after which it may be rewritten
    for arrive, release, action in sorted(items, key=lambda item: item[:2]):
        assert arrive < release, (action, arrive, release)
        free = [i for i, tick in enumerate(released) if tick < arrive or (tick == arrive and not strict)]
        slot = free[0] if free else len(released)
        if not free:
            released.append(0)
        released[slot], slot_of[action] = release, slot
    return slot_of, len(released)
