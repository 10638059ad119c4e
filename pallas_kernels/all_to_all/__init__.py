"""All-to-all kernels for the expert-parallel exchange: on TPUs over a whole mesh axis (remote DMAs between chips,
`all_to_all`), on Hopper GPUs among the GPUs of a node (NVLink writes, `node_all_to_all`)."""
from pallas_kernels.all_to_all.gpu import node_all_to_all
from pallas_kernels.all_to_all.tpu import all_to_all

__all__ = ["all_to_all", "node_all_to_all"]
