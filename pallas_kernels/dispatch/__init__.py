"""Token dispatch (gather into expert-contiguous order, optionally FP8-quantized and padded per expert) and
weighted combine (back to token order, float32 sums): a jnp reference, Pallas TPU and Pallas GPU (Triton) kernels."""
from pallas_kernels.dispatch.api import Dispatched, combine, dispatch, padded_rows

__all__ = ["Dispatched", "combine", "dispatch", "padded_rows"]
