"""The MoE layer's routed-expert ops (dispatch, grouped matmul, combine, the expert-parallel all-to-all) as named by
a resolved KernelSet (dsv3_jax.kernels)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from dsv3_jax.kernels import KernelSet
from pallas_kernels import dispatch as dispatch_kernels
from pallas_kernels import grouped_matmul as gmm_kernels
from pallas_kernels.all_to_all import all_to_all, node_all_to_all
from pallas_kernels.fp8 import dequantize, quantize_1x128


# KernelSet.exchange -> (the transport over the whole expert axis, the transport inside nodes); None: lax's
EXCHANGES = {"lax": (None, None), "tpu": (all_to_all, None), "gpu": (None, node_all_to_all)}


@dataclasses.dataclass(frozen=True)
class MoEKernels:
    """The routed experts' kernels: dispatch/combine and grouped matmul implementations by name (`reference`,
    `tpu`, `gpu`), `interpret` to run Pallas kernels in their CPU interpreters, and the all-to-alls the
    expert-parallel exchange moves rows with: `exchange` over the whole expert axis, `node_exchange` inside nodes
    (None: lax's)."""
    dispatch_impl: str = "reference"
    grouped_matmul_impl: str = "reference"
    interpret: bool = False
    exchange: Callable | None = None
    node_exchange: Callable | None = None

    @classmethod
    def of(cls, kernels: KernelSet) -> "MoEKernels":
        return cls(kernels.dispatch, kernels.grouped_matmul, kernels.interpret, *EXCHANGES[kernels.exchange])

    def dispatch(self, x_TD, experts_TK, n_experts):
        return dispatch_kernels.dispatch(x_TD, experts_TK, n_experts, impl=self.dispatch_impl,
                                         interpret=self.interpret)

    def grouped_matmul_fn(self, fp8: bool = False, power_of_two: bool = False) -> Callable:
        """(x_ND, w_EDF, group_sizes_E) -> y_NF, differentiable; FP8 block-scaled operands in all three GEMMs when
        `fp8` (DeepSeek-V3's recipe for the routed experts)."""
        if fp8:
            return functools.partial(gmm_kernels.grouped_matmul_fp8, impl=self.grouped_matmul_impl,
                                     interpret=self.interpret, power_of_two=power_of_two)
        return functools.partial(gmm_kernels.grouped_matmul, impl=self.grouped_matmul_impl, interpret=self.interpret)

    def combine(self, y_ND, weights_TK, sent, out_dtype):
        return dispatch_kernels.combine(y_ND, weights_TK, sent.order_N, out_dtype, row_TK=sent.row_TK,
                                        impl=self.dispatch_impl, interpret=self.interpret)

    def wire_codec(self, fp8: bool, power_of_two: bool = False):
        """How the expert-parallel exchange sends rows toward the experts: with `fp8`, E4M3 with one scale per row
        per 128 columns (the tiles the FP8 grouped matmul quantizes its input to); None: in the activations' dtype."""
        if not fp8:
            return None
        return functools.partial(quantize_1x128, power_of_two=power_of_two), _fp8_decode

    @property
    def partitionable(self) -> bool:
        """Whether XLA can partition these ops over a sharded mesh itself: the references can; Pallas TPU and Mosaic
        GPU kernels are custom calls that must run per shard, inside a shard_map."""
        return self.dispatch_impl == "reference" and self.grouped_matmul_impl == "reference"


def _fp8_decode(payload, dtype):
    x_q, scale_NDb = payload
    return dequantize(x_q, scale_NDb, (1, 128), dtype)
