"""Multi-process start-up: `jax.distributed.initialize` from command-line flags or the cluster's environment."""

from __future__ import annotations

import os
from typing import Mapping

import jax


class DistributedError(ValueError):
    """Inconsistent multi-process settings; the message names the flag or variable."""


def cluster_from_environment(env: Mapping[str, str]) -> str | None:
    """Which multi-process environment `env` describes ("slurm", "tpu", "jax_env"), or None."""
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "jax_env"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return "slurm"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "tpu"
    return None


def resolve(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            env: Mapping[str, str] = os.environ) -> dict | None:
    """Keyword arguments for jax.distributed.initialize, or None for a single-process run.

    Explicit: coordinator HOST:PORT, number of processes, this process's id (all three, or none). Implicit: SLURM
    (more than one task), Cloud TPU VMs of several hosts, and `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` +
    `JAX_PROCESS_ID`. A single process needs nothing. CPU processes exchange over gloo."""
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if any(v is not None for v in given.values()):
        missing = [flag for flag, v in given.items() if v is None]
        if missing:
            raise DistributedError(f"{missing[0]} is missing: give --coordinator, --num-processes and --process-id "
                                   "together")
        return _checked(coordinator, num_processes, process_id, "--")
    kind = cluster_from_environment(env)
    if kind == "jax_env":
        try:
            n, i = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise DistributedError("JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be "
                                   "integers") from None
        return _checked(env["JAX_COORDINATOR_ADDRESS"], n, i, "JAX_")
    if kind in ("slurm", "tpu"):
        return {}     # jax detects these clusters itself
    return None


def _checked(coordinator: str, num_processes: int, process_id: int, style: str) -> dict:
    names = ("--coordinator", "--num-processes", "--process-id") if style == "--" else \
        ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"{names[0]}={coordinator!r}: expected HOST:PORT")
    if num_processes < 1:
        raise DistributedError(f"{names[1]}={num_processes}: must be at least 1")
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"{names[2]}={process_id}: must be in [0, {num_processes})")
    return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               env: Mapping[str, str] = os.environ) -> bool:
    """Start jax.distributed when this is a multi-process run (see `resolve`); True if it did. Call it before anything
    asks JAX for its devices."""
    kwargs = resolve(coordinator, num_processes, process_id, env)
    if kwargs is None or kwargs.get("num_processes") == 1:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU processes; GPUs and TPUs ignore it
    jax.distributed.initialize(**kwargs)
    return True
