"""dsv3_jax: DeepSeek-V3 in JAX/Flax (MLA with YaRN, DeepSeekMoE, MTP) and its training recipe.

Shape suffixes, here and in pallas_kernels/ and sharding/: the capitals ending a name are its array's axes in
order (`logits_BTV`: batch, tokens, vocabulary). One letter, one meaning:

  A  a v head (v_head_dim)                    N  (token, choice) rows in expert order: a grouped matmul's rows
  B  batch rows                               O  offset of a predicted token (1: the next one; 1 + d: MTP depth d)
  C  a matmul's contracted (input) features   P  ranks along a mesh axis: pipeline stages, expert-parallel peers
  D  model width (hidden size)                Q  a q/k head, U + R (qk_head_dim)
  E  routed experts; a grouped matmul's       R  a q/k head's RoPE part (qk_rope_head_dim)
     groups, one per expert                   S  key/value positions: the sequence attended to, the decode cache
  F  FFN hidden width (an expert's, in MoE)   T  tokens: a sequence's (query) positions; the batch's tokens
  G  expert groups of group-limited routing      flattened in MoE layers, and a plain matmul's rows
  H  attention heads                          U  a q/k head's unrotated, no-RoPE part (qk_nope_head_dim)
  J  a matmul's output features               V  vocabulary
  K  experts chosen per token (top-k)         W  MLA's compressed KV latent (kv_lora_rank)
  L  layers                                   X  axes of any shape, carried along (a payload, leading dims)
  M  micro-batches of one update              Y  work items of a kernel's grid: the (group, row tile) visits
                                              Z  prediction depth: MTP modules, MTP drafts chained in decoding
  1, 2  an axis of that literal size.
  A lowercase letter is one block of its capital's axis (t, s: a block of T, S positions; c, n: 128 of C, N;
  e: some of the experts, a rank's or a group's); `b` after a capital counts that axis in blocks (Cb = C / 128).
"""

from dsv3_jax.io import hf
from dsv3_jax.config import ConfigError, ModelConfig, YarnConfig
from dsv3_jax.model.counting import ParamCount, count_params
from dsv3_jax.model import DeepSeekV3, ModelOutputs, init_variables, logical_axes
from dsv3_jax.config.presets import PRESETS, get_preset

__all__ = [
    "ConfigError", "ModelConfig", "YarnConfig", "ParamCount", "count_params", "DeepSeekV3", "ModelOutputs",
    "init_variables", "logical_axes", "PRESETS", "get_preset", "hf",
]
