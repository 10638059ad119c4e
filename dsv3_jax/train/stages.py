"""DeepSeekV3 cut into pipeline stages: the embedding and dense blocks first, slices of the MoE stack, then the head,
MTP modules and loss. Each part runs the model's own modules on its slice of the ordinary parameter tree.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels import ExpertSplit, KernelSet
from dsv3_jax.model.block import block_stack
from dsv3_jax.model.layers.rope import rope_tables
from dsv3_jax.model.model import embedding, final_norm, head_logits, head_weight, mtp_outputs, run_stack
from dsv3_jax.model.moe.layer import EXPERT_WEIGHTS
from dsv3_jax.model.mtp import MTPModule
from dsv3_jax.train.loss import LossConfig, prediction_loss, valid_targets
from sharding.rules import mesh_spec

FIRST_KEYS = ("embed", "dense_layers")   # top-level parameter groups of the first stage
STAGE_KEY = "moe_layers"                 # the stacked group split into stage chunks; the rest is the last stage's


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """Which MoE layers each pipeline stage runs: `real[s]` layers of the stack, in order, then `slots − real[s]`
    padding layers (identities).

    The MoE stack need not split evenly (V3's 58 MoE layers over 16 stages): every stage holds the same number of
    layer slots (SPMD), and a stage with fewer real layers fills its last slots with padding layers whose parameters
    are zeros (a block that would be the identity: every residual branch ends in a zero projection). The padding is
    never run: each stage's program runs its real layers only (StageFns.stage, the executor's stage variants); its
    gradients are zeros and its router statistics are dropped. The padding goes to the stages that also run the
    embedding and dense blocks, or the head and MTP modules (`balanced`), so that each stage's work is about the
    same."""
    real: tuple[int, ...]

    @property
    def n_stages(self) -> int:
        return len(self.real)

    @property
    def slots(self) -> int:
        return max(self.real)

    @property
    def padded(self) -> bool:
        return min(self.real) < self.slots

    @property
    def index_PL(self) -> np.ndarray:
        """[stage P, slot L] -> layer of the ordinary stack; padding slots point one past its end."""
        n_layers, out, first = sum(self.real), np.empty((self.n_stages, self.slots), np.int32), 0
        for s, n in enumerate(self.real):
            out[s] = [first + i if i < n else n_layers for i in range(self.slots)]
            first += n
        return out

    @property
    def real_PL(self) -> np.ndarray:
        """1.0 where a slot holds a real layer, 0.0 for padding."""
        return (np.arange(self.slots)[None, :] < np.asarray(self.real)[:, None]).astype(np.float32)

    @property
    def real_slots(self) -> np.ndarray:
        """Flat slot positions (stage-major) of the stack's layers, in order."""
        return np.flatnonzero(self.real_PL.reshape(-1))

    @classmethod
    def balanced(cls, config: ModelConfig, n_stages: int) -> "StageLayout":
        """ceil(L / PP) slots per stage for the L MoE layers; each padding slot goes to the stage with the most work
        (its layers, plus the dense blocks on the first stage and the MTP modules and head on the last; ties to the
        earlier stage), never leaving a stage without a MoE layer. V3 on 16 stages: 1, 3, 4 × 13, 2.
        One-line ValueError when there are fewer MoE layers than stages."""
        n_moe = config.n_moe_layers
        if n_moe < n_stages:
            raise ValueError(f"pipeline: model.n_layers={config.n_layers} − first_k_dense_replace="
                             f"{config.first_k_dense_replace} = {n_moe} MoE layers are fewer than "
                             f"mesh.pipeline={n_stages} stages")
        slots = -(-n_moe // n_stages)
        real = [slots] * n_stages
        extra = [0] * n_stages
        extra[0] += config.first_k_dense_replace
        extra[-1] += config.num_mtp_modules + 1
        for _ in range(slots * n_stages - n_moe):
            s = max((s for s in range(n_stages) if real[s] > 1), key=lambda s: (real[s] + extra[s], -s))
            real[s] -= 1
        return cls(tuple(real))


def shares_embedding(config: ModelConfig) -> bool:
    """Whether the last stage needs the embedding too (MTP embeds the next tokens; a tied head attends with it)."""
    return config.tie_word_embeddings or config.num_mtp_modules > 0


def split_variables(config: ModelConfig, params: dict, moe_bias: dict, layout: StageLayout):
    """(stage, first, last) parts of the ordinary variables; the MoE stack's leading layer axis L becomes
    (PP, slots) by `layout`, padding slots zero.

    stage = {"params", "moe_bias", "real"} with leaves [PP, slots, ...] ("real": layout.real_PL); first = the
    embedding and dense blocks' params; last = {"params", "moe_bias"} of the final norm, head and MTP modules, plus
    the embedding when shared.
    """
    if layout.padded:
        index_PL = layout.index_PL
        chunk = lambda tree: jax.tree.map(
            lambda a: jnp.concatenate([a, jnp.zeros((1, *a.shape[1:]), a.dtype)])[index_PL], tree)
    else:
        n = layout.n_stages
        chunk = lambda tree: jax.tree.map(lambda a: a.reshape(n, a.shape[0] // n, *a.shape[1:]), tree)
    stage = {"params": chunk(params[STAGE_KEY]), "moe_bias": chunk(moe_bias.get(STAGE_KEY, {})),
             "real": jnp.asarray(layout.real_PL)}
    first = {k: v for k, v in params.items() if k in FIRST_KEYS}
    keep = lambda k: k not in FIRST_KEYS + (STAGE_KEY,) or (k == "embed" and shares_embedding(config))
    last = {"params": {k: v for k, v in params.items() if keep(k)},
            "moe_bias": {k: v for k, v in moe_bias.items() if keep(k)}}
    return stage, first, last


def stack_layers(layout: StageLayout, tree):
    """Leaves [PP, slots, ...] -> [L, ...]: the real slots in stack order (gradients, per-layer statistics)."""
    return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[layout.real_slots] if layout.padded
                        else a.reshape(-1, *a.shape[2:]), tree)


def stage_specs(stage_vars: dict, axis: str = "pipeline", expert_axis: str | None = None) -> dict:
    """PartitionSpecs of split_variables' stage part: stages over `axis`; with an `expert_axis`, the routed experts
    (leaves [PP, L/PP, E, ...]) are split over it too, E/EP per rank."""
    def spec(path, _):
        name = getattr(path[-1], "key", None)
        return P(axis, None, expert_axis) if expert_axis and name in EXPERT_WEIGHTS else P(axis)
    return jax.tree_util.tree_map_with_path(spec, stage_vars)


SPLIT_MIN_SIZE = 1 << 20   # end_specs: leaves with fewer elements stay whole on every device


def end_specs(tree, mesh, expert_axis: str | None, batch_axes: tuple[str, ...], min_size: int = SPLIT_MIN_SIZE):
    """PartitionSpecs for the first / last stage's variables inside the executor: routed experts (MTP modules) over
    `expert_axis`, run expert-parallel; any other leaf of at least `min_size` elements over `batch_axes` (each on
    the largest dimension it divides, as ZeRO-1 moments are), gathered whole where it is used; the rest whole."""
    def spec(path, leaf):
        if expert_axis and getattr(path[-1], "key", None) in EXPERT_WEIGHTS:
            return P(expert_axis)
        if leaf.size < max(min_size, 1):
            return P()
        return mesh_spec(None, leaf.shape, mesh, (), extra=batch_axes)
    return jax.tree_util.tree_map_with_path(spec, tree)


def gather_whole(tree, specs, expert_axis: str | None):
    """Inside the executor: every leaf split by end_specs over batch axes, all-gathered whole (its gradient comes
    back reduce-scattered); routed experts split over `expert_axis` stay split."""
    def gather(path, leaf, spec):
        if expert_axis and getattr(path[-1], "key", None) in EXPERT_WEIGHTS:
            return leaf
        for dim, entry in enumerate(spec):
            if entry is not None:
                leaf = jax.lax.all_gather(leaf, entry, axis=dim, tiled=True)
        return leaf
    return jax.tree_util.tree_map_with_path(gather, tree, specs)


def join_gradients(layout: StageLayout, g_stage: dict, g_first: dict, g_last: dict) -> dict:
    """Gradients in the ordinary params layout from the three parts' (the embedding's two gradients add; the
    padding slots' are dropped)."""
    grads = {**g_last["params"], **g_first}
    if "embed" in g_last["params"]:
        grads["embed"] = jax.tree.map(jnp.add, g_first["embed"], g_last["params"]["embed"])
    grads[STAGE_KEY] = stack_layers(layout, g_stage["params"])
    return grads


def micro_batch_data(config: ModelConfig, batches: dict):
    """(inputs, targets, side, n_tokens) for the executor, from (M, B, T) batches.

    side: rope cos / sin and segment ids, which every stage needs. targets: the tokens and, per prediction offset
    (1 for the next token, d + 2 for MTP depth d), weights valid · M·B / the whole step's count of valid targets, so
    that a mean over the rows of any batch shard, averaged over shards and micro-batches, is the step's mean over
    all its valid targets (as the accumulating train step's).
    """
    tokens_MBT = batches["tokens"]
    M, B, T = tokens_MBT.shape
    segment_ids_MBT = batches.get("segment_ids")
    positions_MBT = batches.get("positions")
    if positions_MBT is None:
        positions_MBT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (M, B, T))
    cos, sin = rope_tables(positions_MBT, config)
    side = {"cos": cos, "sin": sin}
    if segment_ids_MBT is not None:
        side["segment_ids"] = segment_ids_MBT

    rows = lambda a: a.reshape(M * B, T)
    n_offsets = config.num_mtp_modules + 1
    valid_OMBT = valid_targets(rows(tokens_MBT), None if segment_ids_MBT is None else rows(segment_ids_MBT),
                               n_offsets).astype(jnp.float32).reshape(n_offsets, M, B, T)
    count_O = valid_OMBT.sum(axis=(1, 2, 3))
    weights_OMBT = valid_OMBT * (M * B / jnp.maximum(count_O, 1.0))[:, None, None, None]
    targets = {"tokens": tokens_MBT, "weights": jnp.moveaxis(weights_OMBT, 0, 2)}   # (M, B, offsets, T)
    n_tokens = count_O[0]
    return tokens_MBT, targets, side, n_tokens


class FirstStage(nn.Module):
    """The model's embedding and dense blocks (parameter names as in DeepSeekV3)."""
    config: ModelConfig
    kernels: KernelSet

    @nn.compact
    def __call__(self, tokens_BT, rope_cos_sin, segment_ids_BT):
        c = self.config
        x_BTD = embedding(c)(tokens_BT)
        if c.first_k_dense_replace > 0:
            stack = block_stack(c, self.kernels, False, c.first_k_dense_replace, "dense_layers")
            x_BTD, _, _ = run_stack(stack, x_BTD, rope_cos_sin, segment_ids_BT)
        return x_BTD


class LastStage(nn.Module):
    """The model's final norm and MTP modules (DeepSeekV3's own pieces): the head's inputs (head_in_BTD,
    mtp_head_in_ZBTD | None) and mtp_stats | None; the loss applies the head (loss.head_cross_entropy)."""
    config: ModelConfig
    kernels: KernelSet

    @nn.compact
    def __call__(self, x_BTD, tokens_BT, rope_cos_sin, segment_ids_BT):
        c = self.config
        embed = embedding(c)
        modules = [MTPModule(c, self.kernels, name=f"mtp_{d}") for d in range(c.num_mtp_modules)]
        mtp_head_in_ZBTD, mtp_stats = mtp_outputs(modules, embed, None, x_BTD, tokens_BT, rope_cos_sin,
                                                  segment_ids_BT)
        return final_norm(c)(x_BTD), mtp_head_in_ZBTD, mtp_stats


class StageFns:
    """The executor's first_fn, stage_fn and loss_fn (with side inputs and aux outputs) for one model and loss.

    The activation passed between stages is (x_BTD, balance): the hidden state and the running sum of the MoE
    layers' sequence-wise balance losses, so that they enter the loss (and get their gradient) at the last stage.

    On a mesh with an `expert` axis the stages run expert-parallel: each rank holds E/EP routed experts of its stage
    (stage_specs) and its MoE layers exchange tokens over `expert` inside the executor's shard_map; so do the MTP
    modules on the last stage. The first and last stages' other large parameters (embedding, dense blocks, head, MTP
    blocks) are split over the batch axes and gathered whole where a stage uses them (end_specs, gather_whole), so
    that no device holds all of them for the whole step."""

    def __init__(self, config: ModelConfig, kernels: KernelSet, loss: LossConfig, layout: StageLayout,
                 expert_axis: str | None = None):
        """With `expert_axis` (manual in the executor), stage_vars hold E/EP routed experts per rank (stage_specs)
        and the stage's and the MTP modules' MoE layers exchange tokens over it."""
        self.config, self.loss_config, self.expert_axis = config, loss, expert_axis
        self.kernels = kernels.split_experts(
            ExpertSplit(expert_axis, node_size=kernels.expert_node_size) if expert_axis else None)
        self.first_stage, self.last_stage = FirstStage(config, kernels), LastStage(config, self.kernels)
        self.layout = layout
        self.stacks = {n: block_stack(config, self.kernels, True, n, STAGE_KEY) for n in sorted(set(layout.real))}

    def first(self, specs, first_params, tokens_BT, side):
        """The embedding and dense blocks; `specs`: end_specs of first_params."""
        params = gather_whole(first_params, specs, self.expert_axis)
        x_BTD = self.first_stage.apply({"params": params}, tokens_BT, (side["cos"], side["sin"]),
                                       side.get("segment_ids"))
        return x_BTD, jnp.zeros((), jnp.float32)

    def stage(self, stage_vars, carried, side, variant: int | None = None):
        """The stage's first `variant` slots of MoE blocks (its real layers, StageLayout.real; None: every slot),
        padding slots skipped; the layers' balance losses join the carried sum, the expert counts (slots, E) come out
        (zeros for skipped slots)."""
        x_BTD, balance = carried
        n = self.layout.slots if variant is None else variant
        first_n = lambda tree: jax.tree.map(lambda a: a[:n], tree)
        variables = {"params": first_n(stage_vars["params"]), "moe_bias": first_n(stage_vars["moe_bias"])}
        x_BTD, (stats, _) = self.stacks[n].apply(variables, x_BTD, (side["cos"], side["sin"]),
                                                 side.get("segment_ids"), None, None)
        counts_LE = jnp.pad(stats.expert_counts_E, ((0, self.layout.slots - n), (0, 0)))
        return (x_BTD, balance + (stats.balance_loss * stage_vars["real"][:n]).sum()), counts_LE

    def loss(self, specs, last_vars, carried, targets, side):
        """loss.prediction_loss of one micro-batch shard; metrics are its parts and the MTP modules' expert counts;
        `specs`: end_specs of last_vars."""
        x_BTD, balance = carried
        c, cfg = self.config, self.loss_config
        last_vars = gather_whole(last_vars, specs, self.expert_axis)
        tokens_BT, weights_BOT = targets["tokens"], targets["weights"]
        variables = {"params": last_vars["params"], "moe_bias": last_vars["moe_bias"]}
        head_in_BTD, mtp_head_in_ZBTD, mtp_stats = self.last_stage.apply(
            variables, x_BTD, tokens_BT, (side["cos"], side["sin"]), side.get("segment_ids"))
        rows = x_BTD.shape[0]   # weights are valid · M·B / count: a mean over rows is the step's share
        value, metrics = prediction_loss(
            functools.partial(head_logits, c), head_weight(c, last_vars["params"]), head_in_BTD, mtp_head_in_ZBTD,
            tokens_BT, jnp.moveaxis(weights_BOT, 1, 0), jnp.full(weights_BOT.shape[1], rows, jnp.float32),
            balance + (0.0 if mtp_stats is None else mtp_stats.balance_loss.sum()), last_vars["mtp_weight"],
            cfg.balance_alpha, cfg.z_loss, cfg.logits_chunk, c.jnp_dtype, cfg.vocab_chunk)
        if mtp_stats is not None:
            metrics["mtp_counts_ZE"] = mtp_stats.expert_counts_E
        return value, metrics
