"""Grouped matmul: rows of group g times W[g], in bf16 / float32 or DeepSeek-V3's block-scaled FP8, with the
gradients of both. `reference` defines the protocol every implementation (`tpu`, `gpu`) follows."""
from pallas_kernels.grouped_matmul.api import grouped_matmul, grouped_matmul_fp8, implementation
from pallas_kernels.grouped_matmul.layout import AlignedRows, aligned_rows, gather_rows, group_of_rows

__all__ = ["AlignedRows", "aligned_rows", "gather_rows", "group_of_rows", "grouped_matmul",
           "grouped_matmul_fp8", "implementation"]
