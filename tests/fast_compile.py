"""Environment for tests that run JAX in a subprocess: the repository on the path, CPU only, and XLA's
cheapest compile settings (these tests compare runs with each other, never time them); `cheap_compiles`, the same
for in-process tests; and `cpu_devices`, the session's 8 simulated CPU devices (tests/conftest.py)."""

import os

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
SIMULATED_DEVICES = 8   # tests/conftest.py asks XLA:CPU for this many host devices


def subprocess_env() -> dict:
    """The subprocess sees the XLA_FLAGS the session started with (one CPU device unless the user asked for more),
    not the 8 simulated devices tests/conftest.py added for the in-process tests."""
    user_flags = os.environ.get("DSV3_TESTS_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
                XLA_FLAGS=f"{user_flags} {FAST_XLA_FLAGS}".strip())


@pytest.fixture(autouse=True, scope="module")
def cheap_compiles():
    """In-process: compile with XLA's cheapest settings for the importing module's tests (import it there)."""
    previous = jax.config.values.get("jax_disable_most_optimizations", False)
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def cpu_devices():
    """The session's simulated CPU devices, for meshes; work placed on no mesh runs on the first of them (as under
    JAX_PLATFORMS=cpu, even where JAX's default backend is an accelerator)."""
    devices = jax.devices("cpu")
    assert len(devices) == SIMULATED_DEVICES, (
        f"{len(devices)} CPU devices, not {SIMULATED_DEVICES}: tests/conftest.py must set "
        f"--xla_force_host_platform_device_count={SIMULATED_DEVICES} in XLA_FLAGS before JAX initialises its backends "
        f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
    with jax.default_device(devices[0]):
        yield devices
