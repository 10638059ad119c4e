"""DeepSeekV3 cut into pipeline stages: the embedding and dense blocks first, equal slices of the MoE stack, then the
head, MTP modules and loss. Each part runs the model's own modules on its slice of the ordinary parameter tree.

The activation passed between stages is (x_BTD, balance): the hidden state and the running sum of the MoE layers'
sequence-wise balance losses, so that they enter the loss (and get their gradient) at the last stage.

On a mesh with an `expert` axis the stages run expert-parallel: each rank holds E/EP routed experts of its stage
(stage_specs) and its MoE layers exchange tokens over `expert` inside the executor's shard_map.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv3_jax.block import block_stack
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.rope import rope_tables
from dsv3_jax.model import embedding, final_norm, head_logits, head_weight, mtp_outputs
from dsv3_jax.moe.backend import expert_parallel_local
from dsv3_jax.moe.layer import EXPERT_WEIGHTS
from dsv3_jax.train.loss import LossConfig, head_cross_entropy, shifted_targets

FIRST_KEYS = ("embed", "dense_layers")   # top-level parameter groups of the first stage
STAGE_KEY = "moe_layers"                 # the stacked group split into stage chunks; the rest is the last stage's


def layers_per_stage(config: ModelConfig, n_stages: int) -> int:
    """MoE layers in each of `n_stages` chunks; a one-line ValueError when they do not split evenly."""
    n_moe = config.n_moe_layers
    if n_moe < n_stages or n_moe % n_stages:
        raise ValueError(f"pipeline: model.n_layers={config.n_layers} − first_k_dense_replace="
                         f"{config.first_k_dense_replace} = {n_moe} MoE layers do not split evenly into "
                         f"mesh.pipeline={n_stages} stages")
    return n_moe // n_stages


def shares_embedding(config: ModelConfig) -> bool:
    """Whether the last stage needs the embedding too (MTP embeds the next tokens; a tied head attends with it)."""
    return config.tie_word_embeddings or config.num_mtp_modules > 0


def split_variables(config: ModelConfig, params: dict, moe_bias: dict, n_stages: int):
    """(stage, first, last) parts of the ordinary variables; the MoE stack's leading layer axis L becomes (PP, L/PP).

    stage = {"params", "moe_bias"} with leaves [PP, L/PP, ...]; first = the embedding and dense blocks' params;
    last = {"params", "moe_bias"} of the final norm, head and MTP modules, plus the embedding when shared.
    """
    chunk = lambda tree: jax.tree.map(lambda a: a.reshape(n_stages, a.shape[0] // n_stages, *a.shape[1:]), tree)
    stage = {"params": chunk(params[STAGE_KEY]), "moe_bias": chunk(moe_bias.get(STAGE_KEY, {}))}
    first = {k: v for k, v in params.items() if k in FIRST_KEYS}
    keep = lambda k: k not in FIRST_KEYS + (STAGE_KEY,) or (k == "embed" and shares_embedding(config))
    last = {"params": {k: v for k, v in params.items() if keep(k)},
            "moe_bias": {k: v for k, v in moe_bias.items() if keep(k)}}
    return stage, first, last


def stage_specs(stage_vars: dict, axis: str = "pipeline", expert_axis: str | None = None) -> dict:
    """PartitionSpecs of split_variables' stage part: stages over `axis`; with an `expert_axis`, the routed experts
    (leaves [PP, L/PP, E, ...]) are split over it too, E/EP per rank."""
    def spec(path, _):
        name = getattr(path[-1], "key", None)
        return P(axis, None, expert_axis) if expert_axis and name in EXPERT_WEIGHTS else P(axis)
    return jax.tree_util.tree_map_with_path(spec, stage_vars)


def join_gradients(g_stage: dict, g_first: dict, g_last: dict) -> dict:
    """Gradients in the ordinary params layout from the three parts' (the embedding's two gradients add)."""
    grads = {**g_last["params"], **g_first}
    if "embed" in g_last["params"]:
        grads["embed"] = jax.tree.map(jnp.add, g_first["embed"], g_last["params"]["embed"])
    grads[STAGE_KEY] = jax.tree.map(lambda g: g.reshape(-1, *g.shape[2:]), g_stage["params"])
    return grads


def micro_batch_data(config: ModelConfig, batches: dict):
    """(inputs, targets, side, n_tokens) for the executor, from (M, B, T) batches.

    side: rope cos / sin and segment ids, which every stage needs. targets: the tokens and, per prediction offset
    (1 for the next token, d + 2 for MTP depth d), weights valid · B / count over the whole micro-batch, so that a
    mean over the rows of any batch shard, averaged over shards, is the micro-batch's mean over valid targets.
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

    def valid(offset):
        if segment_ids_MBT is None:
            return jax.vmap(lambda t: shifted_targets(t, None, offset)[1])(tokens_MBT)
        return jax.vmap(lambda t, s: shifted_targets(t, s, offset)[1])(tokens_MBT, segment_ids_MBT)

    weights, n_tokens = [], None
    for offset in range(1, config.num_mtp_modules + 2):
        valid_MBT = valid(offset).astype(jnp.float32)
        count_M = valid_MBT.sum(axis=(1, 2))
        n_tokens = count_M.sum() if n_tokens is None else n_tokens
        weights.append(valid_MBT * (B / jnp.maximum(count_M, 1.0))[:, None, None])
    targets = {"tokens": tokens_MBT, "weights": jnp.stack(weights, axis=2)}   # (M, B, offsets, T)
    return tokens_MBT, targets, side, n_tokens


class FirstStage(nn.Module):
    """The model's embedding and dense blocks (parameter names as in DeepSeekV3)."""
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, rope_cos_sin, segment_ids_BT):
        c = self.config
        x_BTD = embedding(c)(tokens_BT)
        if c.first_k_dense_replace > 0:
            x_BTD, _ = block_stack(c, False, c.first_k_dense_replace, "dense_layers")(x_BTD, rope_cos_sin,
                                                                                      segment_ids_BT)
        return x_BTD


class LastStage(nn.Module):
    """The model's final norm and MTP modules (DeepSeekV3's own pieces): the head's inputs (head_in_BTD,
    mtp_head_in_DBTD | None) and mtp_stats | None; the loss applies the head (loss.head_cross_entropy)."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, tokens_BT, rope_cos_sin, segment_ids_BT):
        c = self.config
        embed = embedding(c)
        mtp_head_in_DBTD, mtp_stats = mtp_outputs(c, embed, None, x_BTD, tokens_BT, rope_cos_sin, segment_ids_BT)
        return final_norm(c)(x_BTD), mtp_head_in_DBTD, mtp_stats


def weighted_cross_entropy(config: ModelConfig, params: dict, x_BTD, targets_BT, weights_BT, chunk: int):
    """(mean over rows of Σ_t w·CE, the same of w·logsumexp²): the train step's head_cross_entropy with the pipeline's
    global normalisation (weights valid · B / count)."""
    ce_sum, z_sum = head_cross_entropy(functools.partial(head_logits, config), head_weight(config, params), x_BTD,
                                       targets_BT, weights_BT, chunk)
    rows = x_BTD.shape[0]
    return ce_sum / rows, z_sum / rows


class StageFns:
    """The executor's first_fn, stage_fn and loss_fn (with side inputs and aux outputs) for one model and loss."""

    def __init__(self, config: ModelConfig, loss: LossConfig, n_stage_layers: int, expert_axis: str | None = None):
        """With `expert_axis` (manual in the executor), stage_vars hold E/EP routed experts per rank (stage_specs)
        and the stage's MoE layers exchange tokens over it."""
        self.config, self.loss_config, self.expert_axis = config, loss, expert_axis
        self.stack = block_stack(config, True, n_stage_layers, STAGE_KEY)

    def first(self, first_params, tokens_BT, side):
        x_BTD = FirstStage(self.config).apply({"params": first_params}, tokens_BT, (side["cos"], side["sin"]),
                                              side.get("segment_ids"))
        return x_BTD, jnp.zeros((), jnp.float32)

    def stage(self, stage_vars, carried, side):
        """L/PP MoE blocks; the balance losses join the carried sum, the expert counts (L/PP, E) come out."""
        x_BTD, balance = carried
        with expert_parallel_local(self.expert_axis) if self.expert_axis else contextlib.nullcontext():
            x_BTD, stats = self.stack.apply(stage_vars, x_BTD, (side["cos"], side["sin"]), side.get("segment_ids"))
        return (x_BTD, balance + stats.balance_loss.sum()), stats.expert_counts_E

    def loss(self, last_vars, carried, targets, side):
        """total_loss of one micro-batch shard; metrics are its parts and the MTP modules' expert counts."""
        x_BTD, balance = carried
        c, cfg = self.config, self.loss_config
        tokens_BT, weights_BOT = targets["tokens"], targets["weights"]
        variables = {"params": last_vars["params"], "moe_bias": last_vars["moe_bias"]}
        head_in_BTD, mtp_head_in_DBTD, mtp_stats = LastStage(c).apply(
            variables, x_BTD, tokens_BT, (side["cos"], side["sin"]), side.get("segment_ids"))
        cross_entropy = lambda x, offset: weighted_cross_entropy(
            c, last_vars["params"], x, shifted_targets(tokens_BT, None, offset)[0], weights_BOT[:, offset - 1],
            cfg.logits_chunk)
        ce, z = cross_entropy(head_in_BTD, 1)
        value = ce + cfg.z_loss * z
        metrics = {"ce": ce}
        if mtp_head_in_DBTD is not None:
            mtp = jnp.mean(jnp.stack([cross_entropy(mtp_head_in_DBTD[d], d + 2)[0]
                                      for d in range(mtp_head_in_DBTD.shape[0])]))
            value = value + last_vars["mtp_weight"] * mtp
            balance = balance + mtp_stats.balance_loss.sum()
            metrics.update(mtp_ce=mtp, mtp_counts_DE=mtp_stats.expert_counts_E)
        metrics["balance"] = balance
        return value + cfg.balance_alpha * balance, metrics
