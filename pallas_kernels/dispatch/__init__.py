"""Token dispatch (gather into expert-contiguous order) and weighted combine (back to token order)."""
from pallas_kernels.dispatch.api import Dispatched, combine, dispatch

__all__ = ["Dispatched", "combine", "dispatch"]
