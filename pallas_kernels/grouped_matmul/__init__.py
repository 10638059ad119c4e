"""Grouped matmul: rows of group g times W[g]."""
from pallas_kernels.grouped_matmul.api import grouped_matmul

__all__ = ["grouped_matmul"]
