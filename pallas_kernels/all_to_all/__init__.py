"""All-to-all over a mesh axis as a Pallas TPU kernel (remote DMAs between devices), for the expert-parallel
exchange: `sharding.expert_parallel` takes it as its `all_to_all` transport."""
from pallas_kernels.all_to_all.tpu import all_to_all

__all__ = ["all_to_all"]
