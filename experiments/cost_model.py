"""Analytic cost model of DeepSeek-V3 pre-training, checked against the V3 report; prints the `v3-671b` run.
FLOPs per token, per-device memory under PP × EP × ZeRO-1 DP, pipeline bubble, expert all-to-all bytes, GPU-hours per
trillion tokens: every estimate lists its terms, and the assumptions are in the functions' docstrings.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.counting import attention_params, count_params, mlp_params, moe_params, train_flops_per_token
from sharding.pipeline_schedules import Costs, ScheduleError, bubble_formula, make_schedule, simulate

GB = 1e9
# Facts from the DeepSeek-V3 technical report (its training costs): the numbers the model is checked against.
REPORT_GPU_HOURS_PER_TRILLION = 180e3
REPORT_PRETRAIN_TOKENS = 14.8e12
REPORT_PRETRAIN_GPU_HOURS = 2.664e6
REPORT_CONTEXT_EXTENSION_GPU_HOURS = 119e3
REPORT_POST_TRAINING_GPU_HOURS = 5e3
REPORT_TOTAL_GPU_HOURS = 2.788e6
# Context extension, as the report runs it: 1000 steps at 32K × 1920 sequences, then 1000 steps at 128K × 480.
CONTEXT_EXTENSION_PHASES = ((32768, 1920, 1000), (131072, 480, 1000))
# DeepEP's internode (RDMA) bandwidth per GPU for EP16–64, as reported: 43–58 GB/s; the estimate takes 50.
DEEPEP_RDMA_GBPS = 50.0
TILE = 128   # FP8 scales: one float32 per 128 values (1×128 activation tiles, 128×128 weight blocks)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Devices and their layout: PP pipeline stages × (n_gpus / PP) data-parallel ranks, EP of which share experts."""
    n_gpus: int = 2048
    pp: int = 16
    ep: int = 64
    gpus_per_node: int = 8
    peak_flops: float = 989e12    # dense BF16 FLOP/s per GPU (H800 = H100 SXM tensor-core rate), as train/mfu.py
    hbm_bytes: float = 80e9

    @property
    def dp(self) -> int:
        """Data-parallel ranks per stage (EP ranks hold different tokens, so they count)."""
        return self.n_gpus // self.pp

    def validate(self) -> "Cluster":
        if self.n_gpus % self.pp or self.dp % self.ep:
            raise ValueError(f"cluster: n_gpus={self.n_gpus} must split into pp={self.pp} stages of dp ranks that "
                             f"ep={self.ep} divides")
        return self


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What each parameter and activation is stored as, and how a step is cut into micro-batches."""
    seq_len: int = 4096
    batch_seqs: int = 15360          # global sequences per step (after the 3072 → 15360 ramp)
    micro_batch_seqs: int = 1        # sequences per micro-batch per data-parallel rank (4096 tokens, DeepEP's case)
    schedule: str = "dualpipe"
    weights: str = "bf16"            # working copy of the weights: bf16, or fp8 (E4M3 + 128×128 scales for GEMMs)
    grad_bytes: int = 4              # FP32 gradients, accumulated over micro-batches
    master_bytes: int = 4            # FP32 master weights (optimizer state, ZeRO-1 sharded)
    moment_bytes: int = 2            # AdamW moments in BF16
    fp8_activations: bool = True     # GEMM inputs cached for the backward in FP8 with 1×128 scales
    max_nodes: int = 4               # node-limited routing: a token's experts lie on at most this many nodes


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


def model_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Useful training FLOPs per token (fwd + bwd = 3 × fwd, MTP included, causal attention): the MFU numerator."""
    return train_flops_per_token(config, seq_len)


def executed_flops_per_token(config: ModelConfig, seq_len: int, dense_ragged: bool = True) -> float:
    """Matmul FLOPs per token that this implementation executes (what XLA's cost_analysis counts, bar elementwise).

    Two differences from `model_flops_per_token`: the attention core computes the whole T × T score matrix (the
    causal mask is applied, not skipped), and with `dense_ragged` the routed experts' grouped matmul
    (`jax.lax.ragged_dot`, which JAX lowers on CPU as a masked dense product over all groups) multiplies each of
    the K dispatched rows by all E experts' weights.
    """
    c = config
    counts = count_params(c)
    block_active = attention_params(c) + moe_params(c, c.num_experts_per_tok)
    mtp_active = c.num_mtp_modules * (2 * c.dim * c.dim + block_active + c.vocab_size * c.dim)
    weights = counts.activated + mtp_active   # `activated` counts the head (the embedding lookup is not a matmul)
    if dense_ragged:
        routed_per_layer = c.num_experts_per_tok * mlp_params(c.dim, c.moe_intermediate_size)
        weights += (c.n_routed_experts - 1) * routed_per_layer * (c.n_moe_layers + c.num_mtp_modules)
    attention_fwd = (c.n_layers + c.num_mtp_modules) * 2 * c.n_heads * (c.qk_head_dim + c.v_head_dim) * seq_len
    return 3.0 * (2.0 * weights + attention_fwd)


def train_state_bytes(config: ModelConfig, moments_dtype_bytes: int = 4) -> dict:
    """Bytes of the project's TrainState on one device: parameters (param_dtype), AdamW mu and nu, routing biases."""
    counts = count_params(config)
    n_params = counts.total + counts.mtp_unique
    param_bytes = n_params * _itemsize(config.param_dtype)
    moments = 2 * n_params * moments_dtype_bytes
    bias = (config.n_moe_layers + config.num_mtp_modules) * config.n_routed_experts * 4 if config.n_moe_layers else 0
    return dict(n_params=n_params, params_bytes=param_bytes, opt_state_bytes=moments, moe_bias_bytes=bias,
                state_bytes=param_bytes + moments + bias)


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


# ---------------------------------------------------------------------------------------------------------------
# Parameters per pipeline stage and device


def expert_params_per_layer(c: ModelConfig) -> int:
    return c.n_routed_experts * mlp_params(c.dim, c.moe_intermediate_size)


def stage_params(c: ModelConfig, pp: int) -> list[dict]:
    """Per pipeline stage: decoder layers (split as evenly as possible, earlier stages take the remainder), their
    expert and other parameters; the embedding goes with stage 0, final norm, head and MTP modules with the last."""
    per_stage = [c.n_layers // pp + (1 if s < c.n_layers % pp else 0) for s in range(pp)]
    dense_layer = attention_params(c) + 2 * c.dim + mlp_params(c.dim, c.intermediate_size)
    moe_other = attention_params(c) + 2 * c.dim + moe_params(c, 0)
    mtp_other = c.num_mtp_modules * (4 * c.dim + 2 * c.dim * c.dim + moe_other)
    stages, layer = [], 0
    for s, n in enumerate(per_stage):
        layers = range(layer, layer + n)
        layer += n
        dense = sum(1 for i in layers if i < c.first_k_dense_replace)
        moe = n - dense
        other = dense * dense_layer + moe * moe_other
        expert = moe * expert_params_per_layer(c)
        if s == 0:
            other += c.vocab_size * c.dim
        if s == pp - 1:
            other += c.dim + (0 if c.tie_word_embeddings else c.vocab_size * c.dim) + mtp_other
            expert += c.num_mtp_modules * expert_params_per_layer(c)
        stages.append(dict(stage=s, layers=n, dense_layers=dense, moe_layers=moe, other_params=other,
                           expert_params=expert, has_head=s == pp - 1))
    return stages


def device_chunks(schedule: str, pp: int, device: int) -> tuple[int, ...]:
    """Stages a device holds: its own, and with DualPipe also stage PP−1−d (the other direction's)."""
    return (device, pp - 1 - device) if schedule == "dualpipe" else (device,)


# ---------------------------------------------------------------------------------------------------------------
# Activations


def activation_bytes_per_token(c: ModelConfig, fp8: bool = True) -> dict:
    """Bytes one token leaves for the backward in each kind of layer, under DeepSeek-V3's memory savings.

    Kept: residual inputs (BF16; RMSNorm is recomputed from them), GEMM inputs (FP8 + 1×128 scales when `fp8`, the
    attention output too, else BF16), MLA's latents and the rope key (the up-projections are recomputed), the
    flash-attention log-sum-exp, FP32 router scores, and per routed choice the dispatched input and the SwiGLU input
    (its output and the expert output are recomputed). The T × T scores are never stored.
    """
    a = (1 + 4 / TILE) if fp8 else 2
    D, H = c.dim, c.n_heads
    attention = 2 * D + a * D + a * (c.q_lora_rank or 0) + a * c.kv_lora_rank + 2 * c.qk_rope_head_dim \
        + a * H * c.v_head_dim + 4 * H
    ffn_in = 2 * D + a * D
    moe = ffn_in + 4 * c.n_routed_experts + c.num_experts_per_tok * (a * D + a * 2 * c.moe_intermediate_size) \
        + a * 2 * c.n_shared_experts * c.moe_intermediate_size
    dense = ffn_in + a * 2 * c.intermediate_size
    mtp = a * 2 * D + attention + moe + a * D          # eh_proj input, one MoE block, its head input
    return dict(dense_layer=attention + dense, moe_layer=attention + moe, mtp_module=mtp, head_input=a * D)


def peak_activations(schedule: str, pp: int, n_micro: int, device: int,
                     chunk_bytes: dict[int, float]) -> tuple[int, float]:
    """(most micro-batches in flight, most activation bytes held) on `device` over its program: a forward adds
    the micro-batch's activations for the stage it runs (`chunk_bytes[stage]`), its backward frees them."""
    built = make_schedule(schedule, pp, n_micro)
    live = peak_count = 0
    held = peak_bytes = 0.0
    for slot in built.programs[device]:
        for action in slot:   # a pair counts its forward first: the stash holds both for a moment
            sign = 1 if action.kind == "F" else -1
            live += sign
            held += sign * chunk_bytes[action.stage]
            peak_count, peak_bytes = max(peak_count, live), max(peak_bytes, held)
    return peak_count, peak_bytes


# ---------------------------------------------------------------------------------------------------------------
# The full run


def micro_batches(cluster: Cluster, recipe: Recipe) -> int:
    per_rank = recipe.batch_seqs // cluster.dp
    return per_rank // recipe.micro_batch_seqs


def device_memory(c: ModelConfig, cluster: Cluster, recipe: Recipe) -> list[dict]:
    """Per device: weights, FP32 gradients, ZeRO-1 optimizer state (master + moments over the DP ranks; expert
    parameters over the dp / ep replicas of each expert), activations of the in-flight micro-batches (those of
    the stage each micro-batch is in, followed through the device's program) and the float32 logits of one
    micro-batch on a device that holds the head."""
    stages = stage_params(c, cluster.pp)
    tokens = recipe.micro_batch_seqs * recipe.seq_len
    acts = activation_bytes_per_token(c, recipe.fp8_activations)
    n_micro = micro_batches(cluster, recipe)
    expert_replicas = cluster.dp // cluster.ep
    rows = []
    for d in range(cluster.pp):
        held = [stages[s] for s in device_chunks(recipe.schedule, cluster.pp, d)]
        other = sum(s["other_params"] for s in held)
        expert = sum(s["expert_params"] for s in held) / cluster.ep
        tables = sum(int(s["stage"] == 0) + int(s["has_head"] and not c.tie_word_embeddings) for s in held)
        embed_head = tables * c.vocab_size * c.dim
        if recipe.weights == "fp8":   # GEMM weights in E4M3 with a float32 scale per 128×128 block; tables stay BF16
            weights = 2 * embed_head + (other - embed_head + expert) * (1 + 4 / TILE ** 2)
        else:
            weights = 2 * (other + expert)
        n = other + expert
        optimizer = (recipe.master_bytes + 2 * recipe.moment_bytes) * (other / cluster.dp + expert / expert_replicas)

        def chunk_activations(s):
            per_token = s["dense_layers"] * acts["dense_layer"] + s["moe_layers"] * acts["moe_layer"]
            if s["has_head"]:
                per_token += c.num_mtp_modules * acts["mtp_module"] + acts["head_input"]
            return per_token * tokens

        peak, activations = peak_activations(recipe.schedule, cluster.pp, n_micro, d,
                                             {s["stage"]: chunk_activations(s) for s in held})
        logits = 4 * tokens * c.vocab_size if any(s["has_head"] for s in held) else 0
        total = weights + recipe.grad_bytes * n + optimizer + activations + logits
        rows.append(dict(device=d, stages=[s["stage"] for s in held], params=n, weights_bytes=weights,
                         grads_bytes=recipe.grad_bytes * n, optimizer_bytes=optimizer, in_flight=peak,
                         activation_bytes=activations, logits_bytes=logits, total_bytes=total))
    return rows


def schedule_bubble(schedule: str, pp: int, n_micro: int, f: float = 1.0, b: float = 2.0) -> dict:
    """Bubble of a schedule (sharding.pipeline_schedules' table formula and its simulation) with backward = b and
    forward = f, no F&B overlap gain and W = 0 (the backward is not split); `fraction` = bubble / makespan."""
    built = make_schedule(schedule, pp, n_micro)
    costs = Costs(f, b)
    timeline = simulate(built, costs)
    return dict(schedule=schedule, pp=pp, micro=n_micro, formula=bubble_formula(built, costs),
                simulated=max(timeline.bubbles), makespan=timeline.makespan,
                fraction=max(timeline.bubbles) / timeline.makespan)


def pipeline_bubble(cluster: Cluster, recipe: Recipe) -> dict:
    """The run's bubble: its schedule over PP stages and the micro-batches of one step, backward = 2 × forward."""
    return schedule_bubble(recipe.schedule, cluster.pp, micro_batches(cluster, recipe))


def all_to_all_bytes_per_token(c: ModelConfig, recipe: Recipe) -> dict:
    """Expert-parallel traffic per token and MoE layer (the MTP module's included in `per_step`).

    Dispatch sends the token's FP8 row (D bytes + a float32 scale per 128) once per target node over RDMA (at most
    `max_nodes`, the node limit) and once per chosen expert over NVLink; combine returns K BF16 rows over NVLink,
    summed per node before one BF16 row per node crosses RDMA. The backward mirrors both (dispatch's backward is a
    combine and vice versa), here counted in BF16 both ways.
    """
    K, D = c.num_experts_per_tok, c.dim
    fp8_row, bf16_row = D + 4 * D / TILE, 2 * D
    nodes = min(recipe.max_nodes, K)
    fwd = dict(dispatch_rdma=nodes * fp8_row, dispatch_nvlink=K * fp8_row, combine_rdma=nodes * bf16_row,
               combine_nvlink=K * bf16_row)
    bwd = dict(dispatch_rdma=nodes * bf16_row, dispatch_nvlink=K * bf16_row, combine_rdma=nodes * bf16_row,
               combine_nvlink=K * bf16_row)
    layers = c.n_moe_layers + c.num_mtp_modules
    per_layer_fwd = sum(fwd.values())
    per_step = layers * (per_layer_fwd + sum(bwd.values()))
    rdma_fwd = fwd["dispatch_rdma"] + fwd["combine_rdma"]
    return dict(forward=fwd, backward=bwd, per_layer_forward=per_layer_fwd, rdma_per_layer_forward=rdma_fwd,
                moe_layers=layers, per_token_step=per_step)


def gpu_hours_per_trillion(flops_per_token: float, mfu: float, peak_flops: float) -> float:
    return 1e12 * flops_per_token / (mfu * peak_flops) / 3600


def implied_mfu(gpu_hours_per_trillion_tokens: float, flops_per_token: float, peak_flops: float) -> float:
    return 1e12 * flops_per_token / (gpu_hours_per_trillion_tokens * 3600 * peak_flops)


def context_extension_gpu_hours(c: ModelConfig, mfu: float, peak_flops: float) -> float:
    """The two YaRN phases at the pre-training MFU (longer context: more attention FLOPs per token)."""
    hours = 0.0
    for seq_len, batch, steps in CONTEXT_EXTENSION_PHASES:
        tokens = seq_len * batch * steps
        hours += tokens * model_flops_per_token(c, seq_len) / (mfu * peak_flops) / 3600
    return hours


def run_report(c: ModelConfig, cluster: Cluster, recipe: Recipe, mfu: float | None = None) -> dict:
    """Every estimate for the run; `mfu` None takes the one the report's 180K GPU-hours per trillion tokens implies."""
    cluster.validate()
    flops = model_flops_per_token(c, recipe.seq_len)
    counts = count_params(c)
    implied = implied_mfu(REPORT_GPU_HOURS_PER_TRILLION, flops, cluster.peak_flops)
    mfu = implied if mfu is None else mfu
    per_trillion = gpu_hours_per_trillion(flops, mfu, cluster.peak_flops)
    pretrain = per_trillion * REPORT_PRETRAIN_TOKENS / 1e12
    context = context_extension_gpu_hours(c, mfu, cluster.peak_flops)
    memory = device_memory(c, cluster, recipe)
    a2a = all_to_all_bytes_per_token(c, recipe)
    tokens_micro = recipe.micro_batch_seqs * recipe.seq_len
    layer_fwd_flops = (model_flops_per_token(c, recipe.seq_len) / 3) / (c.n_layers + c.num_mtp_modules)
    compute_s = tokens_micro * layer_fwd_flops / (mfu * cluster.peak_flops)
    rdma_s = tokens_micro * a2a["rdma_per_layer_forward"] / (DEEPEP_RDMA_GBPS * GB)
    return dict(
        params=dict(total=counts.total, activated=counts.activated, mtp=counts.mtp_unique),
        flops_per_token=flops, flops_per_token_6n=6 * counts.activated,
        mfu=mfu, implied_mfu=implied, implied_mfu_fp8_peak=implied / 2,
        gpu_hours_per_trillion=per_trillion, pretrain_gpu_hours=pretrain, context_extension_gpu_hours=context,
        context_extension_implied_mfu=mfu * context / REPORT_CONTEXT_EXTENSION_GPU_HOURS,
        total_gpu_hours=pretrain + context + REPORT_POST_TRAINING_GPU_HOURS,
        memory=memory, worst_device=max(memory, key=lambda r: r["total_bytes"]),
        bubble=pipeline_bubble(cluster, recipe), all_to_all=a2a,
        rdma_to_compute=rdma_s / compute_s, cluster=dataclasses.asdict(cluster), recipe=dataclasses.asdict(recipe))


def format_report(r: dict) -> str:
    cl, rc, w, b, a = r["cluster"], r["recipe"], r["worst_device"], r["bubble"], r["all_to_all"]
    lines = [
        f"pre-training on {cl['n_gpus']} GPUs: PP{cl['pp']} × EP{cl['ep']} × ZeRO-1 DP"
        f"{cl['n_gpus'] // cl['pp']}, {rc['schedule']}, {rc['seq_len']}-token sequences, {rc['batch_seqs']} per step",
        f"params: {r['params']['total'] / 1e9:.1f}B total, {r['params']['activated'] / 1e9:.2f}B activated, MTP "
        f"{r['params']['mtp'] / 1e9:.2f}B",
        f"FLOPs per token (fwd+bwd = 3 × fwd, MTP, causal attention at {rc['seq_len']}): "
        f"{r['flops_per_token'] / 1e9:.1f} GFLOP ({r['flops_per_token_6n'] / 1e9:.1f} from 6 × activated alone)",
        f"report: {REPORT_GPU_HOURS_PER_TRILLION / 1e3:.0f}K GPU-hours per trillion tokens → implied MFU "
        f"{r['implied_mfu']:.1%} of {cl['peak_flops'] / 1e12:.0f} TFLOP/s BF16 ({r['implied_mfu_fp8_peak']:.1%} of the "
        f"FP8 peak)",
        f"at MFU {r['mfu']:.1%}: {r['gpu_hours_per_trillion'] / 1e3:.1f}K GPU-hours per trillion tokens; pre-training "
        f"{REPORT_PRETRAIN_TOKENS / 1e12:.1f}T tokens {r['pretrain_gpu_hours'] / 1e6:.3f}M (report "
        f"{REPORT_PRETRAIN_GPU_HOURS / 1e6:.3f}M)",
        f"  context extension at that MFU {r['context_extension_gpu_hours'] / 1e3:.0f}K (report "
        f"{REPORT_CONTEXT_EXTENSION_GPU_HOURS / 1e3:.0f}K: MFU {r['context_extension_implied_mfu']:.1%} there); + "
        f"post-training {REPORT_POST_TRAINING_GPU_HOURS / 1e3:.0f}K = {r['total_gpu_hours'] / 1e6:.3f}M total (report "
        f"{REPORT_TOTAL_GPU_HOURS / 1e6:.3f}M)",
        f"pipeline: {b['schedule']} PP={b['pp']} M={b['micro']} (F=1, B=2): bubble {b['simulated']:g} units (formula "
        f"{b['formula']:g}) of {b['makespan']:g}, {b['fraction']:.1%} of the step",
        f"all-to-all per token per MoE layer, forward: dispatch {a['forward']['dispatch_rdma'] / 1e3:.1f} KB RDMA + "
        f"{a['forward']['dispatch_nvlink'] / 1e3:.1f} KB NVLink (FP8), combine {a['forward']['combine_rdma'] / 1e3:.1f}"
        f" KB RDMA + {a['forward']['combine_nvlink'] / 1e3:.1f} KB NVLink (BF16); per token per step (fwd+bwd, "
        f"{a['moe_layers']} MoE layers) {a['per_token_step'] / 1e6:.1f} MB",
        f"  RDMA time / compute time per MoE layer at {DEEPEP_RDMA_GBPS:.0f} GB/s and MFU {r['mfu']:.1%}: "
        f"{r['rdma_to_compute']:.2f}",
        f"memory per device (GB; weights {rc['weights']}, grads FP32, master FP32 + moments BF16 over ZeRO-1, "
        f"activations {'FP8' if rc['fp8_activations'] else 'BF16'} GEMM inputs):",
        "  device  stages  params(B)  weights  grads  optimizer  in-flight  activations  logits  total",
    ]
    for m in r["memory"]:
        lines.append(f"  {m['device']:6d}  {','.join(map(str, m['stages'])):>6s}  {m['params'] / 1e9:9.2f}  "
                     f"{m['weights_bytes'] / GB:7.1f}  {m['grads_bytes'] / GB:5.1f}  {m['optimizer_bytes'] / GB:9.1f}  "
                     f"{m['in_flight']:9d}  {m['activation_bytes'] / GB:11.1f}  {m['logits_bytes'] / GB:6.1f}  "
                     f"{m['total_bytes'] / GB:5.1f}")
    lines.append(f"worst device {w['device']}: {w['total_bytes'] / GB:.1f} GB of {cl['hbm_bytes'] / GB:.0f} GB")
    return "\n".join(lines)


def main(argv=None) -> int:
    """`python -m experiments.cost_model [--mfu 0.4] [--schedule dualpipe] [--weights bf16|fp8] ...` prints the
    `v3-671b` run. The same functions size the small presets, where experiments.scaling's AOT-compiled numbers check
    them: `executed_flops_per_token` (what XLA counts for this implementation) and `train_state_bytes` (params and
    AdamW state of the project's TrainState)."""
    from dsv3_jax.config.presets import get_preset

    p = argparse.ArgumentParser(prog="python -m experiments.cost_model", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="v3-671b")
    p.add_argument("--mfu", type=float, default=None, help="default: the MFU the report's 180K GPU-hours/T implies")
    p.add_argument("--gpus", type=int, default=Cluster.n_gpus)
    p.add_argument("--pp", type=int, default=Cluster.pp)
    p.add_argument("--ep", type=int, default=Cluster.ep)
    p.add_argument("--schedule", default=Recipe.schedule, help="gpipe | 1f1b | dualpipe")
    p.add_argument("--weights", default=Recipe.weights, choices=["bf16", "fp8"])
    p.add_argument("--bf16-activations", action="store_true", help="cache GEMM inputs in BF16 instead of FP8")
    p.add_argument("--batch", type=int, default=Recipe.batch_seqs, help="global sequences per step")
    p.add_argument("--seq-len", type=int, default=Recipe.seq_len)
    args = p.parse_args(argv)
    try:
        if args.mfu is not None and not 0 < args.mfu <= 1:
            raise ValueError(f"--mfu={args.mfu}: must be in (0, 1]")
        config = get_preset(args.preset)
        cluster = Cluster(n_gpus=args.gpus, pp=args.pp, ep=args.ep).validate()
        recipe = Recipe(seq_len=args.seq_len, batch_seqs=args.batch, schedule=args.schedule, weights=args.weights,
                        fp8_activations=not args.bf16_activations)
        if recipe.batch_seqs % (cluster.dp * recipe.micro_batch_seqs):
            raise ValueError(f"--batch={recipe.batch_seqs}: not a multiple of the {cluster.dp} data-parallel ranks")
        report = run_report(config, cluster, recipe, args.mfu)
    except (ValueError, ScheduleError) as e:   # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.preset}: " + format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
