"""Three train steps of the tiny model on an 8-device mesh (data=2, expert=4), run as one process with 8 CPU
devices or as one of two processes with 4 each; writes the losses and final parameters' fingerprints as JSON.

    python tests/sharding/multihost_step.py OUT.json [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""

import json
import os
import sys

out_path, cluster = sys.argv[1], sys.argv[2:]
os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                           f"--xla_force_host_platform_device_count={8 // (int(cluster[1]) if cluster else 1)}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sharding.distributed import initialize  # noqa: E402

if cluster:
    assert initialize(cluster[0], int(cluster[1]), int(cluster[2]))

import dataclasses  # noqa: E402

from dsv3_jax import get_preset  # noqa: E402
from dsv3_jax.train.build import build_step  # noqa: E402
from dsv3_jax.train.optimizer import OptimizerConfig  # noqa: E402
from dsv3_jax.train.run_config import compile_run  # noqa: E402
from dsv3_jax.train.schedule import ScheduleConfig  # noqa: E402
from dsv3_jax.train.step import BalanceConfig  # noqa: E402
from sharding import batch_sharding, build_mesh  # noqa: E402

assert jax.device_count() == 8
config = get_preset("tiny").replace(n_layers=2, vocab_size=128, dtype="float32")
run = dataclasses.replace(compile_run(config, batch=16, seq_len=32), schedule=ScheduleConfig(peak_lr=1e-2, warmup=1),
                          optimizer=OptimizerConfig(eps=1e-3), balance=BalanceConfig(gamma=0.01))
mesh = build_mesh({"data": 2, "expert": 4})
built = build_step(run, mesh)
state, run = built.init_state(), built.jitted
tokens = np.random.default_rng(0).integers(0, 128, size=(3, 1, 16, 32)).astype(np.int32)
losses = []
for i in range(3):
    batch = jax.make_array_from_callback(tokens[i].shape, batch_sharding(mesh, 1, 3), lambda index: tokens[i][index])
    state, metrics = run(state, {"tokens": batch}, jnp.float32(i * 512), jnp.float32(np.inf))
    losses.append(float(metrics["loss"]))
everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
gathered = jax.jit(lambda tree: tree, out_shardings=everywhere)((state.params, state.moe_bias))
leaves = [np.asarray(x.addressable_data(0), np.float64) for x in jax.tree.leaves(gathered)]
result = {"losses": losses, "abs_sums": [float(np.abs(x).sum()) for x in leaves],
          "firsts": [float(x.reshape(-1)[0]) for x in leaves], "process": jax.process_index()}
if jax.process_index() == 0:
    with open(out_path, "w") as f:
        json.dump(result, f)
print("ok", flush=True)
