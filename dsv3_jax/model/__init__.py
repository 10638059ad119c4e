"""The network: layers (MLA, MLP, norms, RoPE/YaRN), DeepSeekMoE, MTP, the decoder block and DeepSeekV3, and the
parameter and FLOP counts. Modules receive a resolved kernel set (dsv3_jax.kernels); they never pick one."""

from dsv3_jax.model.model import (DeepSeekV3, ModelOutputs, embedding, final_norm, head_logits, head_weight,
                                  init_variables, logical_axes, mtp_outputs, output_head)

__all__ = ["DeepSeekV3", "ModelOutputs", "embedding", "final_norm", "head_logits", "head_weight", "init_variables",
           "logical_axes", "mtp_outputs", "output_head"]
