"""Inference: a latent (absorbed-MLA) cache, prefill and decode steps, batched generation (`generate`), and MTP
speculative decoding (`generate_speculative`: greedy's tokens at temperature 0, the same distribution otherwise).
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
