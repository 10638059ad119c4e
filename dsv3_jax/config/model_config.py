"""ModelConfig: every shape and switch of a DeepSeek-V2/V3 network, its checks, and the HF config.json mapping.
A frozen dataclass: `validate()` raises one-line `ConfigError`s naming the field at fault, `with_overrides` applies
`--set` strings (dsv3_jax.config.overrides); the presets, plain Python, are in dsv3_jax.config.presets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import jax.numpy as jnp

from dsv3_jax import kernels as kernel_registry   # its check; the module imports only config.errors
from dsv3_jax.config.errors import ConfigError
from dsv3_jax.config.overrides import apply_overrides


SCORE_FUNCS = ("sigmoid", "softmax")
# How experts are chosen, named as in DeepSeek's configs:
#   noaux_tc             group score = sum of the top-2 biased scores in a group (V3)
#   group_limited_greedy group score = max score in a group (V2)
#   greedy               no group limit (V2-Lite)
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
# What a remat'd decoder block keeps for the backward pass (the rest is recomputed there):
#   none           everything (no remat; fastest while it fits in memory)
#   full           only the block's input (least memory, one extra forward per block)
#   dots           every matmul output, attention scores included (the xla core's (B, H, T, S) scores are large)
#   dots_no_batch  the projections' outputs (matmuls without batch dims); the attention core and the MoE
#                  experts (ragged / grouped matmuls, not dot_general) are recomputed: the usual GPU choice
#                  when `none` does not fit
#   save_attn_out  only the attention core's output (named "attn_out"); every projection is recomputed
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out")
# MLA's training attention core (dsv3_jax.model.layers.attention_core): auto = what the kernel target's chips run
# (dsv3_jax.kernels.attention_for: xla on CPUs, splash on TPUs, blockwise or cudnn on GPUs); xla = einsums + float32
# softmax on any backend; blockwise = the same in query/key blocks with an online softmax (no (B, H, T, S) scores, any
# backend); splash = JAX's Pallas TPU splash attention; cudnn = jax.nn.dot_product_attention's cuDNN flash attention,
# v padded to the q/k head dim; cudnn_mla = JAX's cuDNN attention with unequal head dims (cuDNN >= 9.10, Hopper).
# Both cuDNN cores need a GPU and bf16/fp16.
ATTENTION_IMPLS = ("auto", "xla", "blockwise", "splash", "cudnn", "cudnn_mla")
# auto: the Pallas all-to-all of the chip where model.kernels picks Pallas kernels (TPU: over the whole expert axis;
# Hopper: inside a node, over NVLink), XLA's elsewhere; lax: XLA's collectives everywhere.
EXCHANGE_IMPLS = ("auto", "lax")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    """YaRN context extension, with DeepSeek's mscale convention (`rope_scaling` in config.json)."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    # Amplitude of cos/sin; None derives it from factor, mscale and mscale_all_dim as HF does.
    attention_factor: float | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    dim: int = 7168
    n_layers: int = 61
    first_k_dense_replace: int = 3
    n_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    moe_intermediate_size: int = 2048
    intermediate_size: int = 18432
    rope_theta: float = 10000.0
    rope_scaling: YarnConfig | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_mtp_modules: int = 1
    initializer_range: float = 0.006
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    # Implementation switches (no effect on the function computed).
    scan_layers: bool = True
    remat_policy: str = "none"         # see REMAT_POLICIES
    expert_recompute: bool = False     # expert-parallel MoE: the backward replays the exchange (rows travel again,
                                       # experts run again) instead of keeping its residuals (least memory)
    attention_impl: str = "auto"       # see ATTENTION_IMPLS
    exchange_impl: str = "auto"        # the expert-parallel all-to-all, see EXCHANGE_IMPLS
    # Which kernels run (dsv3_jax.kernels.resolve, once per step, into the KernelSet every layer receives):
    # auto | reference | pallas, for kernel_target "" (the platform of the devices the step is placed on) or
    # cpu | gpu | hopper | tpu, optionally ":interpret".
    kernels: str = "auto"
    kernel_target: str = ""

    # FP8 training (DeepSeek-V3 recipe): block-scaled E4M3 matmuls, forward and both gradients, in every
    # `make_linear` projection (MLA, dense and shared-expert MLPs, MTP eh_proj) and in the routed experts' grouped
    # matmuls (pallas_kernels.grouped_matmul.grouped_matmul_fp8); the embedding, output head, router, norms and
    # attention core keep `dtype`. Power-of-two scales round each scale up to 2^e (UE8M0).
    fp8: bool = False
    fp8_power_of_two_scales: bool = False

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.first_k_dense_replace

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        y = self.rope_scaling
        if y is not None and y.mscale_all_dim:
            m = yarn_mscale(y.factor, y.mscale_all_dim)
            scale *= m * m
        return scale

    # ---- checks --------------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        """Raise ConfigError naming the first impossible field; return self when all is well."""
        positive = ["vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
                    "qk_rope_head_dim", "v_head_dim", "intermediate_size", "max_position_embeddings"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        _check(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
               "q_lora_rank", f"must be a positive integer or None, got {self.q_lora_rank!r}")
        _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
               f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        _check(0 <= self.first_k_dense_replace <= self.n_layers, "first_k_dense_replace",
               f"must be in [0, n_layers={self.n_layers}], got {self.first_k_dense_replace}")
        _check(self.num_mtp_modules >= 0, "num_mtp_modules", f"must be >= 0, got {self.num_mtp_modules}")
        _check(self.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        _check(self.rope_theta > 1, "rope_theta", f"must be > 1, got {self.rope_theta}")
        _check(self.scoring_func in SCORE_FUNCS, "scoring_func", f"must be one of {SCORE_FUNCS}, got {self.scoring_func!r}")
        _check(self.topk_method in TOPK_METHODS, "topk_method", f"must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        _check(self.remat_policy in REMAT_POLICIES, "remat_policy",
               f"must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        for name in ("dtype", "param_dtype"):
            _check(getattr(self, name) in DTYPES, name, f"must be one of {DTYPES}, got {getattr(self, name)!r}")
        self._validate_attention_impl()
        _check(self.exchange_impl in EXCHANGE_IMPLS, "exchange_impl",
               f"must be one of {EXCHANGE_IMPLS}, got {self.exchange_impl!r}")
        kernel_registry.check(self.kernels, self.kernel_target)
        if self.n_moe_layers > 0 or self.num_mtp_modules > 0:
            self._validate_moe()
        y = self.rope_scaling
        if y is not None:
            _check(y.factor >= 1.0, "rope_scaling.factor", f"must be >= 1, got {y.factor}")
            _check(y.original_max_position_embeddings > 0, "rope_scaling.original_max_position_embeddings",
                   f"must be > 0, got {y.original_max_position_embeddings}")
            _check(y.beta_fast > y.beta_slow > 0, "rope_scaling.beta_fast",
                   f"must exceed beta_slow > 0, got beta_fast={y.beta_fast} beta_slow={y.beta_slow}")
        return self

    def _validate_attention_impl(self) -> None:
        impl = self.attention_impl
        _check(impl in ATTENTION_IMPLS, "attention_impl", f"must be one of {ATTENTION_IMPLS}, got {impl!r}")
        if impl in ("auto", "xla", "blockwise", "splash"):   # auto picks only a core the shapes and dtype allow
            return
        _check(self.dtype in ("bfloat16", "float16"), "attention_impl",
               f"is {impl!r} (cuDNN flash attention), which needs model.dtype bfloat16 or float16, got {self.dtype!r}")
        dims = {"qk_head_dim": self.qk_head_dim}   # 'cudnn' pads v to it; 'cudnn_mla' passes v as it is
        if impl == "cudnn_mla":
            dims["v_head_dim"] = self.v_head_dim
        for name, d in dims.items():
            _check(d % 8 == 0 and d <= 256, "attention_impl",
                   f"is {impl!r}: cuDNN needs head dims that are multiples of 8 and <= 256, got {name}={d}")
        _check(impl != "cudnn" or self.v_head_dim <= self.qk_head_dim, "attention_impl",
               f"is 'cudnn', which pads v to the q/k head dim, so v_head_dim={self.v_head_dim} must be <= "
               f"qk_head_dim={self.qk_head_dim}")

    def _validate_moe(self) -> None:
        e, k, g, kg = self.n_routed_experts, self.num_experts_per_tok, self.n_group, self.topk_group
        _check(e > 0, "n_routed_experts", f"must be > 0 when the model has MoE layers, got {e}")
        _check(self.n_shared_experts >= 0, "n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        _check(self.moe_intermediate_size > 0, "moe_intermediate_size", f"must be > 0, got {self.moe_intermediate_size}")
        _check(1 <= k <= e, "num_experts_per_tok", f"must be in [1, n_routed_experts={e}], got {k}")
        _check(g >= 1 and e % g == 0, "n_group", f"must divide n_routed_experts={e}, got {g}")
        _check(1 <= kg <= g, "topk_group", f"must be in [1, n_group={g}], got {kg}")
        if self.topk_method != "greedy" and g > 1:
            kept = kg * (e // g)
            _check(k <= kept, "num_experts_per_tok",
                   f"={k} exceeds the {kept} experts in the topk_group={kg} kept groups of {e // g}")
            if self.topk_method == "noaux_tc":
                _check(e // g >= 2, "n_group", f"noaux_tc scores groups by their top-2 experts, so each of "
                       f"the {g} groups needs >= 2 experts, got {e // g}")
        _check(self.routed_scaling_factor > 0, "routed_scaling_factor", f"must be > 0, got {self.routed_scaling_factor}")

    # ---- overrides -----------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def with_overrides(self, *assignments: str) -> "ModelConfig":
        """Apply `field=value` strings (the `--set model.field=value` form without the prefix; dsv3_jax.config.overrides)."""
        return apply_overrides(self, assignments, prefix="model")

    # ---- Hugging Face config.json ----------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any], **changes: Any) -> "ModelConfig":
        """Read a `transformers` DeepseekV2/V3 config (dict, config.json or a directory holding one)."""
        hf = _read_hf_dict(source)
        rope_params = dict(hf.get("rope_parameters") or {})
        rope_scaling = hf.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
        yarn = None
        if rope_scaling:
            kind = rope_scaling.get("type", rope_scaling.get("rope_type"))
            if kind != "yarn":
                raise ConfigError(f"rope_scaling.type must be 'yarn' (the only scaling DeepSeek uses), got {kind!r}")
            yarn = YarnConfig(
                factor=float(rope_scaling["factor"]),
                original_max_position_embeddings=int(rope_scaling["original_max_position_embeddings"]),
                beta_fast=float(rope_scaling.get("beta_fast") or 32),
                beta_slow=float(rope_scaling.get("beta_slow") or 1),
                mscale=float(rope_scaling.get("mscale") or 0),
                mscale_all_dim=float(rope_scaling.get("mscale_all_dim") or 0),
                attention_factor=rope_scaling.get("attention_factor"),
            )
        model_type = hf.get("model_type", "deepseek_v3")
        default_method = "noaux_tc" if model_type == "deepseek_v3" else "greedy"
        scoring = hf.get("scoring_func", "sigmoid" if model_type == "deepseek_v3" else "softmax")
        n_routed = hf.get("n_routed_experts") or hf.get("num_local_experts") or hf.get("num_experts") or 0
        fields = dict(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            first_k_dense_replace=hf.get("first_k_dense_replace", 0),
            n_heads=hf["num_attention_heads"],
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            n_routed_experts=n_routed,
            n_shared_experts=hf.get("n_shared_experts") or 0,
            num_experts_per_tok=hf.get("num_experts_per_tok") or 1,
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            topk_method=hf.get("topk_method") or default_method,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            scoring_func=scoring,
            # HF's DeepseekV2 never renormalises top-k weights, whatever its config says.
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)) if model_type == "deepseek_v3" else False,
            moe_intermediate_size=hf.get("moe_intermediate_size") or 0,
            intermediate_size=hf["intermediate_size"],
            rope_theta=float(hf.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
            rope_scaling=yarn,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            num_mtp_modules=int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0),
            initializer_range=float(hf.get("initializer_range", 0.006)),
        )
        if hf.get("rope_interleave") is False:
            raise ConfigError("rope_interleave=False is not supported: DeepSeek checkpoints use interleaved RoPE pairs")
        fields.update(changes)
        return cls(**fields).validate()

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that `transformers.DeepseekV3Config` (or V2 for softmax routing) loads."""
        hf: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM" if self.scoring_func == "sigmoid" else "DeepseekV2ForCausalLM"],
            "model_type": "deepseek_v3" if self.scoring_func == "sigmoid" else "deepseek_v2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "first_k_dense_replace": self.first_k_dense_replace,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "topk_method": self.topk_method,
            "routed_scaling_factor": self.routed_scaling_factor,
            "scoring_func": self.scoring_func,
            "norm_topk_prob": self.norm_topk_prob,
            "moe_intermediate_size": self.moe_intermediate_size,
            "intermediate_size": self.intermediate_size,
            "moe_layer_freq": 1,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_interleave": True,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "num_nextn_predict_layers": self.num_mtp_modules,
            "initializer_range": self.initializer_range,
            "attention_bias": False,
            "torch_dtype": self.param_dtype,
        }
        y = self.rope_scaling
        if y is not None:
            hf["rope_scaling"] = {
                "type": "yarn", "rope_type": "yarn", "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings,
                "beta_fast": y.beta_fast, "beta_slow": y.beta_slow,
                "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim,
            }
            if y.attention_factor is not None:
                hf["rope_scaling"]["attention_factor"] = y.attention_factor
        return hf


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1·mscale·ln(factor) + 1 (1 when there is no extension)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"model.{field} {message}")


def _read_hf_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None

