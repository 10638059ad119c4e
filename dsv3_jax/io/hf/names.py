"""The map between HF tensor names and our variables: `plan_slots(config)` lists every HF tensor in HF order as a
`Slot`: the leaf it fills (layers stacked on `dense_layers` / `moe_layers`, experts on their E axis, MTP module d
from HF layer n_layers + d, routing biases in `moe_bias`), at which index, after which shape transform."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.moe.router import BIAS_COLLECTION


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one HF tensor lands in our variables: leaf `(collection, *path)`, at leading `index` (layer, expert),
    after `kind`:

        copy        as stored                       t   2-D transpose (HF Linear (out, in) -> kernel (in, out))
        fused_gate  (E, 2F, D)[:, :F] -> (E, D, F)  fused_up  (E, 2F, D)[:, F:] -> (E, D, F)
        t3          (E, D, F) -> (E, F, D)

    `load=False` marks the MTP copies of the embedding and head: shape-checked, never stored. `optional`: a tensor
    a checkpoint may lack (its leaf keeps zeros)."""

    hf_name: str
    leaf: tuple[str, ...]
    index: tuple[int, ...] = ()
    kind: str = "copy"
    load: bool = True
    optional: bool = False


def hf_shape(kind: str, target_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stored shape whose `kind` transform has `target_shape`."""
    if kind == "t":
        return tuple(reversed(target_shape))
    if kind in ("fused_gate", "fused_up"):
        e, d, f = target_shape
        return (e, 2 * f, d)
    if kind == "t3":
        e, f, d = target_shape
        return (e, d, f)
    return tuple(target_shape)


def to_ours(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "t":
        return array.T
    if kind in ("fused_gate", "fused_up"):
        half = array.shape[1] // 2
        part = array[:, :half] if kind == "fused_gate" else array[:, half:]
        return part.transpose(0, 2, 1)
    if kind == "t3":
        return array.transpose(0, 2, 1)
    return array


def to_hf(kind: str, array: np.ndarray) -> np.ndarray:
    """Inverse of `to_ours` for the kinds that saving uses."""
    if kind == "t":
        return array.T
    if kind == "copy":
        return array
    raise ValueError(f"saving never writes {kind!r} tensors")


def _attention_slots(c: ModelConfig, hf: str, ours: tuple[str, ...], index: tuple[int, ...]) -> list[Slot]:
    a, o = hf + "self_attn.", ours + ("attn",)
    lin = lambda name, leaf: Slot(f"{a}{name}.weight", o + (leaf, "kernel"), index, "t")
    norm = lambda name, leaf: Slot(f"{a}{name}.weight", o + (leaf, "scale"), index)
    if c.q_lora_rank is None:
        query = [lin("q_proj", "wq")]
    else:
        query = [lin("q_a_proj", "wq_a"), norm("q_a_layernorm", "q_norm"), lin("q_b_proj", "wq_b")]
    return query + [lin("kv_a_proj_with_mqa", "wkv_a"), norm("kv_a_layernorm", "kv_norm"),
                    lin("kv_b_proj", "wkv_b"), lin("o_proj", "wo")]


def _mlp_slots(hf: str, ours: tuple[str, ...], index: tuple[int, ...]) -> list[Slot]:
    return [Slot(f"{hf}{p}_proj.weight", ours + (p, "kernel"), index, "t") for p in ("gate", "up", "down")]


def _moe_slots(c: ModelConfig, hf: str, ours: tuple[str, ...], index: tuple[int, ...], fused: bool) -> list[Slot]:
    m, o = hf + "mlp.", ours + ("moe",)
    slots = [Slot(f"{m}gate.weight", o + ("router", "kernel"), index, "t"),
             Slot(f"{m}gate.e_score_correction_bias", (BIAS_COLLECTION,) + o[1:] + ("router", "bias"), index,
                   optional=True)]
    if c.n_shared_experts > 0:
        slots += _mlp_slots(f"{m}shared_experts.", o + ("shared",), index)
    leaf = lambda name: o + (f"experts_{name}",)
    if fused:
        return slots + [Slot(f"{m}experts.gate_up_proj", leaf("gate"), index, "fused_gate"),
                        Slot(f"{m}experts.gate_up_proj", leaf("up"), index, "fused_up"),
                        Slot(f"{m}experts.down_proj", leaf("down"), index, "t3")]
    for j in range(c.n_routed_experts):
        slots += [Slot(f"{m}experts.{j}.{p}_proj.weight", leaf(p), index + (j,), "t") for p in ("gate", "up", "down")]
    return slots


def _block_slots(c: ModelConfig, hf: str, ours: tuple[str, ...], index: tuple[int, ...], use_moe: bool,
                 fused: bool) -> list[Slot]:
    """One decoder block: HF prefix `hf` (e.g. 'model.layers.3.'), our leaf prefix `ours` ('params', ...)."""
    slots = [Slot(f"{hf}input_layernorm.weight", ours + ("attn_norm", "scale"), index),
             Slot(f"{hf}post_attention_layernorm.weight", ours + ("mlp_norm", "scale"), index)]
    slots += _attention_slots(c, hf, ours, index)
    if use_moe:
        return slots + _moe_slots(c, hf, ours, index, fused)
    return slots + _mlp_slots(f"{hf}mlp.", ours + ("mlp",), index)


def _mtp_slots(c: ModelConfig, depth: int, fused: Callable[[str], bool]) -> list[Slot]:
    hf, ours = f"model.layers.{c.n_layers + depth}.", ("params", f"mtp_{depth}")
    tied = c.tie_word_embeddings
    head = (("params", "embed", "embedding"), "copy") if tied else (("params", "lm_head", "kernel"), "t")
    return [
        Slot(f"{hf}embed_tokens.weight", ("params", "embed", "embedding"), load=False),
        Slot(f"{hf}enorm.weight", ours + ("enorm", "scale")),
        Slot(f"{hf}hnorm.weight", ours + ("hnorm", "scale")),
        Slot(f"{hf}eh_proj.weight", ours + ("eh_proj", "kernel"), kind="t"),
        *_block_slots(c, hf, ours + ("block",), (), True, fused(hf)),
        Slot(f"{hf}shared_head.norm.weight", ours + ("head_norm", "scale")),
        Slot(f"{hf}shared_head.head.weight", head[0], kind=head[1], load=False),
    ]


def plan_slots(c: ModelConfig, fused: Callable[[str], bool] = lambda prefix: False) -> list[Slot]:
    """Every HF tensor of `c`, in HF order; `fused(prefix)` says whether a layer stores fused experts."""
    slots = [Slot("model.embed_tokens.weight", ("params", "embed", "embedding"))]
    for i in range(c.n_layers):
        hf, use_moe = f"model.layers.{i}.", i >= c.first_k_dense_replace
        stack = "moe_layers" if use_moe else "dense_layers"
        index = (i - c.first_k_dense_replace,) if use_moe else (i,)
        slots += _block_slots(c, hf, ("params", stack), index, use_moe, fused(hf))
    slots.append(Slot("model.norm.weight", ("params", "final_norm", "scale")))
    if not c.tie_word_embeddings:
        slots.append(Slot("lm_head.weight", ("params", "lm_head", "kernel"), kind="t"))
    for depth in range(c.num_mtp_modules):
        slots += _mtp_slots(c, depth, fused)
    return slots


def group_by_leaf(slots: list[Slot], specs: dict) -> dict[tuple[str, ...], list[Slot]]:
    """Slots per leaf, checking (an internal invariant) that the loaded slots cover each leaf exactly once."""
    groups: dict[tuple[str, ...], list[Slot]] = {leaf: [] for leaf in specs}
    for s in slots:
        if s.load and s.leaf not in groups:
            raise RuntimeError(f"internal: HF name map targets {'/'.join(s.leaf)}, which the model does not have")
        if s.load:
            groups[s.leaf].append(s)
    for leaf, group in groups.items():
        indices = [s.index for s in group]
        depth = len(indices[0]) if indices else 0
        if (not group or len(set(indices)) != len(indices) or any(len(i) != depth for i in indices)
                or len(indices) != math.prod(specs[leaf].shape[:depth])):
            raise RuntimeError(f"internal: HF name map does not cover variable {'/'.join(leaf)} exactly once")
    return groups


def slot_shape(slot: Slot, specs: dict) -> tuple[int, ...]:
    """The part of its leaf one slot fills: the leaf's shape past the slot's index (layer, expert) axes."""
    return tuple(specs[slot.leaf].shape[len(slot.index):])

