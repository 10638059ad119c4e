"""Multi-process start-up: flags and environments resolve to jax.distributed arguments or one-line errors;
two processes × 4 CPU devices train like one process with 8."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from sharding.distributed import DistributedError, resolve
from tests.fast_compile import ROOT, subprocess_env

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_step.py")


def test_flags_resolve_to_initialize_arguments():
    assert resolve("node0:1234", 2, 1, env={}) == {"coordinator_address": "node0:1234", "num_processes": 2,
                                                   "process_id": 1}
    assert resolve(env={}) is None
    assert resolve(env={"SLURM_NTASKS": "1"}) is None


def test_environments():
    assert resolve(env={"SLURM_NTASKS": "16"}) == {}
    assert resolve(env={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == {}
    assert resolve(env={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "JAX_NUM_PROCESSES": "4",
                        "JAX_PROCESS_ID": "3"})["process_id"] == 3


@pytest.mark.parametrize("args, env, needle", [
    (("h:1", 2, None), {}, "--process-id is missing"),
    (("h", 2, 0), {}, "--coordinator='h'"),
    (("h:1", 2, 2), {}, "--process-id=2"),
    (("h:1", 0, 0), {}, "--num-processes=0"),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "x"}, "JAX_NUM_PROCESSES"),
])
def test_bad_settings_name_the_flag(args, env, needle):
    with pytest.raises(DistributedError, match=needle.replace("?", r"\?")) as info:
        resolve(*args, env=env)
    assert "\n" not in str(info.value)


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return str(s.getsockname()[1])


def run_processes(commands, timeout=420):
    env = subprocess_env()
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    return outputs


def test_two_processes_train_like_one(tmp_path):
    port = free_port()
    run_processes([[sys.executable, SCRIPT, str(tmp_path / "two.json"), f"localhost:{port}", "2", str(i)]
                   for i in range(2)] + [[sys.executable, SCRIPT, str(tmp_path / "one.json")]])
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    np.testing.assert_allclose(two["abs_sums"], one["abs_sums"], rtol=1e-5)
    np.testing.assert_allclose(two["firsts"], one["firsts"], rtol=1e-5, atol=1e-7)
