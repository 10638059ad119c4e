"""The Mosaic GPU all-to-all inside a node, compiled for compile-only H100s (no CPU interpreter simulates its remote
writes and semaphores): its tiling, that it compiles as one kernel per call, forward and transposed, where the
exchange needs it, how the step estimate prices it, and its one-line errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.estimate import estimate
from pallas_kernels.all_to_all import gpu
from sharding import targets

ROWS = P(("data", "expert"))


@pytest.mark.parametrize("rows, cols, itemsize, tile", [
    (640, 7168, 1, (128, 256)),    # FP8 rows: 256 columns, 32 KiB
    (640, 7168, 2, (64, 256)),     # BF16 rows
    (640, 56, 4, (128, 56)),       # their float32 1×128 scales: one whole row of 224 bytes
    (8, 40, 4, (8, 40)),           # short blocks: the whole block
    (317, 7168, 1, (1, 256)),      # a prime row count: one row a tile
    (317, 56, 4, None),            # ... where no tile is a multiple of 128 bytes
    (8, 6, 1, None),               # a 6-byte row: no TMA tile
])
def test_tiles_divide_the_block_in_16_byte_rows_of_at_most_256_elements(rows, cols, itemsize, tile):
    assert gpu.tile_shape(rows, cols, itemsize) == tile
    if tile is not None:
        tr, tc = tile
        assert rows % tr == 0 and cols % tc == 0 and (tc * itemsize) % 16 == 0 and tc <= 256
        assert (tr * tc * itemsize) % 128 == 0
        assert tr * tc * itemsize <= gpu.TILE_BYTES


def mesh8():
    return Mesh(np.asarray(targets.devices("h100x8")).reshape(2, 4), ("data", "expert"))


def compiled(fn, mesh, shape, dtype, grad=False):
    body = jax.shard_map(fn, mesh=mesh, in_specs=ROWS, out_specs=ROWS)
    if grad:
        body = jax.grad(lambda x: jnp.sum(jax.shard_map(fn, mesh=mesh, in_specs=ROWS, out_specs=ROWS)(x)
                                          .astype(jnp.float32) ** 2))
    arg = jax.ShapeDtypeStruct((8 * shape[0], *shape[1:]), dtype, sharding=NamedSharding(mesh, ROWS))
    return jax.jit(body).lower(arg).compile()


def kernel_calls(text: str) -> int:
    return text.count('custom_call_target="mosaic_gpu')


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn, jnp.float32])
def test_compiles_for_h100s_as_one_kernel_forward_and_one_backward(dtype):
    """Groups of 4 ranks (one per data replica) on 8 compile-only H100s: the forward is one Mosaic GPU kernel and no
    XLA all-to-all; its gradient is one more (the transposed exchange)."""
    fn = functools.partial(gpu.all_to_all, axis_name="expert", split_axis=0, concat_axis=0, group_size=4)
    forward = compiled(fn, mesh8(), (4, 64, 256), dtype).as_text()
    assert kernel_calls(forward) == 1 and "all-to-all" not in forward
    if dtype != jnp.float8_e4m3fn:   # FP8 has no square for the loss; the exchange is the same
        assert kernel_calls(compiled(fn, mesh8(), (4, 64, 256), dtype, grad=True).as_text()) == 2


def test_the_estimate_prices_the_kernel_as_an_all_to_all_inside_the_node():
    """3 of its 4 blocks leave each device, all over NVLink; the kernel holds the chip (synchronous)."""
    fn = functools.partial(gpu.all_to_all, axis_name="expert", split_axis=0, concat_axis=0, group_size=4)
    shape = (4, 640, 7168)
    e = estimate(compiled(fn, mesh8(), shape, jnp.bfloat16))
    block_bytes = np.prod(shape) * 2
    assert e.bytes_all_to_all == pytest.approx(block_bytes * 3 / 4)
    assert e.bytes_all_to_all_internode == 0 and e.sync_collectives == 1
    assert e.exposed_comm_s == pytest.approx(e.comm_s) and e.comm_s > 0


def test_untileable_blocks_go_by_lax_in_the_node_transport_and_fail_in_the_kernel():
    """6-byte rows: node_all_to_all uses XLA's all-to-all among the same groups; the kernel itself says why not."""
    fn = functools.partial(gpu.node_all_to_all, axis_name="expert", split_axis=0, concat_axis=0, group_size=4)
    text = compiled(fn, mesh8(), (4, 8, 6), jnp.int8).as_text()
    assert kernel_calls(text) == 0 and "all-to-all" in text
    kernel = functools.partial(gpu.all_to_all, axis_name="expert", split_axis=0, concat_axis=0, group_size=4)
    with pytest.raises(ValueError, match=r"blocks of shape \(8, 6\) int8 have a last dimension TMA cannot tile"):
        compiled(kernel, mesh8(), (4, 8, 6), jnp.int8)
    bad_group = functools.partial(gpu.all_to_all, axis_name="expert", split_axis=0, concat_axis=0, group_size=3)
    with pytest.raises(ValueError, match="group_size=3 does not divide the 4 ranks of axis 'expert'"):
        compiled(bad_group, mesh8(), (3, 8, 128), jnp.bfloat16)


def test_the_expert_exchange_compiles_with_it_inside_nodes():
    """Two nodes of 4 on 8 compile-only H100s, skew rounds and backward included: the hops inside a node are the
    kernel, the hop across nodes stays XLA's all-to-all among ranks of equal local index."""
    import re

    from sharding.expert_parallel import ExchangeOptions, expert_parallel_ffn
    from sharding.mesh import build_mesh
    from tests.sharding.test_expert_parallel import SWIGLU

    t, k, e, d, f = 64, 3, 8, 128, 64
    mesh = build_mesh({"expert": 8}, targets.devices("h100x8"))
    options = ExchangeOptions(node_size=4, node_all_to_all=gpu.node_all_to_all)

    def loss(x, experts, weights, w):
        out, _ = expert_parallel_ffn(x, experts, weights, w, expert_ffn=SWIGLU, mesh=mesh, options=options)
        return out.astype(jnp.float32).sum()

    struct = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))
    w = tuple(struct(s, jnp.bfloat16) for s in ((e, d, f), (e, d, f), (e, f, d)))
    text = jax.jit(jax.grad(loss, argnums=(0, 3))).lower(
        struct((t, d), jnp.bfloat16), struct((t, k), jnp.int32), struct((t, k), jnp.float32), w).compile().as_text()
    assert kernel_calls(text) >= 4, kernel_calls(text)   # rows and results, forward and backward, at least
    xla = re.findall(r"(\w+\[[\d,]*\])\{[\d,]*\}\)? all-to-all(?:-start)?\([^\n]*replica_groups=(\{\{[^\n]*?\}\})",
                     text)
    assert any(groups.startswith("{{0,4}") for _, groups in xla), xla   # across nodes: XLA's
    inside = [shape for shape, groups in xla if groups.startswith("{{0,1,2,3}")]
    # inside a node XLA moves only the rows' expert ids and gate weights ([4, C, k]); rows and results are the kernel's
    assert inside and all(shape.endswith(f",{k}]") for shape in inside), inside
