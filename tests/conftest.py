"""Puts the repository root on sys.path so tests import `dsv3_jax` and shared helpers (`tests.hf_oracle`), and gives
the whole test session 8 simulated CPU devices."""

import os
import sys
import warnings

# The AOT tier (tests/aot) compiles for chips this machine lacks: the CUDA plugin must not look for a driver, and
# libtpu must load in every xdist worker. Both are read when JAX first initialises its backends.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# 8 simulated CPU devices for the whole session, so that the multi-device tests (meshes of 8, pipelines, expert
# parallelism) run in-process. XLA reads XLA_FLAGS once, when JAX first initialises its backends: this must run before
# that, which it does (pytest loads this conftest before collecting any test module, and the plugins loaded earlier
# (xdist, hypothesis, jaxtyping, typeguard, anyio) do not import JAX; xdist workers inherit the flag and load this
# conftest first too). The user's flags stay; a later device-count flag overrides an earlier one. Subprocesses that
# tests start get the flags as they were before (tests/fast_compile.py: subprocess_env), i.e. one device as before.
SIMULATED_DEVICES = 8
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
USER_XLA_FLAGS_VAR = "DSV3_TESTS_USER_XLA_FLAGS"   # XLA_FLAGS as the session found them (kept for subprocesses)


def _simulate_host_devices(n: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ.setdefault(USER_XLA_FLAGS_VAR, flags)   # an xdist worker keeps the controller's (the user's) value
    counts = [flag for flag in flags.split() if flag.startswith(f"{DEVICE_COUNT_FLAG}=")]
    if counts[-1:] != [f"{DEVICE_COUNT_FLAG}={n}"]:
        os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={n}".strip()
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    if xla_bridge is not None and xla_bridge.backends_are_initialized():
        warnings.warn(f"JAX initialised its backends before tests/conftest.py set {DEVICE_COUNT_FLAG}={n}: the "
                      "multi-device tests will fail for want of devices", stacklevel=1)


_simulate_host_devices(SIMULATED_DEVICES)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
