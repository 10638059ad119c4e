"""Helpers shared by the Hugging Face checkpoint tests: tiny random `transformers` DeepSeek models used as
the oracle, random variables for ours, both models' logits, and flat views of our variable trees."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3, init_variables

BIAS_RANGE = (0.05, 0.5)   # positive, so HF's masking semantics never matter


def quiet_transformers():
    """Import transformers with its progress bars and load reports silenced."""
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def build_hf_model(kind: str, seed: int, weight_std: float, **config_kwargs):
    """A float32 eval-mode DeepseekV3ForCausalLM (kind 'v3') or DeepseekV2ForCausalLM ('v2') with random weights."""
    import torch
    transformers = quiet_transformers()
    if kind == "v3":
        config = transformers.DeepseekV3Config(attn_implementation="eager", **config_kwargs)
        model_class = transformers.DeepseekV3ForCausalLM
    else:
        config = transformers.DeepseekV2Config(attn_implementation="eager", **config_kwargs)
        model_class = transformers.DeepseekV2ForCausalLM
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    randomize_hf_(model, seed, weight_std)
    return model


def randomize_hf_(model, seed: int, weight_std: float) -> None:
    """Weights ~ N(0, std²), norm weights 1 ± 0.3 (not all ones), correction biases positive."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.copy_(1.0 + 0.3 * noise if "norm" in name else weight_std * noise)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                low, high = BIAS_RANGE
                buffer.copy_(low + (high - low) * torch.rand(buffer.shape, generator=generator))


def hf_logits(model, tokens_BT: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(tokens_BT, dtype=torch.long)).logits.float().numpy()


@functools.lru_cache(maxsize=None)
def _jitted_apply(config: ModelConfig):
    return jax.jit(DeepSeekV3(config).apply)


def our_logits(config: ModelConfig, variables: dict, tokens_BT: np.ndarray) -> np.ndarray:
    return np.asarray(_jitted_apply(config)(variables, jnp.asarray(tokens_BT, jnp.int32)))


def random_tokens(vocab_size: int, batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=(batch, length), dtype=np.int64)


def flat(tree, leaf_fn=np.asarray, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """{(collection, *path): leaf_fn(leaf)} for a nested dict (numpy arrays by default)."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flat(value, leaf_fn, prefix + (str(key),)))
        return out
    return {prefix: leaf_fn(tree)}


def unflat(leaves: dict[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in leaves.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def random_variables(config: ModelConfig, seed: int, weight_std: float = 0.1, bias: bool = True) -> dict:
    """Variables shaped like init_variables(config), drawn in numpy (fast): weights, norms ≈ 1, positive
    correction biases (zeros with bias=False, as in V2 models, which have none)."""
    abstract = jax.eval_shape(functools.partial(init_variables, config), jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)
    leaves = {}
    for path, spec in flat(abstract, leaf_fn=lambda spec: spec).items():
        if path[0] == "moe_bias":
            value = rng.uniform(*BIAS_RANGE, size=spec.shape) if bias else np.zeros(spec.shape)
        elif path[-1] == "scale":
            value = 1.0 + 0.3 * rng.standard_normal(spec.shape)
        else:
            value = weight_std * rng.standard_normal(spec.shape)
        leaves[path] = value.astype(spec.dtype)
    return unflat(leaves)


def perturb_norms_and_bias(variables: dict, seed: int) -> dict:
    """init_variables output with norm scales 1 ± 0.3 and positive random correction biases."""
    rng = np.random.default_rng(seed)
    leaves = flat(variables)
    for path, value in leaves.items():
        if path[0] == "moe_bias":
            leaves[path] = rng.uniform(*BIAS_RANGE, size=value.shape).astype(value.dtype)
        elif path[-1] == "scale":
            leaves[path] = (1.0 + 0.3 * rng.standard_normal(value.shape)).astype(value.dtype)
    return unflat(leaves)


def load_quietly(load, *args, **kwargs):
    """Call `load`, returning (its result, the warning messages it raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load(*args, **kwargs)
    return result, [str(w.message) for w in caught]
