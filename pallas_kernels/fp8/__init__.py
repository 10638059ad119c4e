"""Block-scaled FP8 (E4M3) quantization and matmul, DeepSeek-V3 style: 1×128 activation tiles, 128×128 weight
blocks, float32 accumulation promoted every 128 of the contraction C."""
from pallas_kernels.fp8.api import blockwise_matmul, fp8_matmul
from pallas_kernels.fp8.quantize import (AMAX_FLOOR, FP8_DTYPE, FP8_MAX, dequantize, quantize_1x128, quantize_128x1,
                                         quantize_128x128)

__all__ = ["AMAX_FLOOR", "FP8_DTYPE", "FP8_MAX", "blockwise_matmul", "dequantize", "fp8_matmul",
           "quantize_128x1", "quantize_1x128", "quantize_128x128"]
