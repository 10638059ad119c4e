"""Inference: a latent (absorbed-MLA) cache, prefill and decode steps, batched generation, MTP speculation.

    result = generate(config, variables, [[1, 2, 3], [4, 5]], max_new_tokens=16, stop_tokens=[eos_id])
    result = generate_speculative(config, variables, prompts, 16, n_draft=2)   # MTP drafts; greedy's tokens
    result = generate_speculative(config, variables, prompts, 16, temperature=0.7, top_p=0.9)   # same distribution
"""

from dsv3_jax.infer.cache import DecodeCache, LatentCache, init_cache, values_per_token_per_layer
from dsv3_jax.infer.decode import Generation, decode_step, forward_with_cache, generate, mtp_with_cache, prefill
from dsv3_jax.infer.sampling import sample_tokens, token_probs, top_p_filter
from dsv3_jax.infer.speculative import accept_drafts, generate_speculative, speculative_prefill, speculative_step
from dsv3_jax.model.layers.mla import attend_absorbed, attend_naive

__all__ = [
    "DecodeCache", "LatentCache", "init_cache", "values_per_token_per_layer", "Generation", "attend_absorbed",
    "attend_naive", "decode_step", "forward_with_cache", "generate", "mtp_with_cache", "prefill",
    "sample_tokens", "token_probs", "top_p_filter", "accept_drafts", "generate_speculative", "speculative_prefill",
    "speculative_step",
]
