"""Environment for tests that run JAX in a subprocess: the repository on the path, CPU only, and XLA's
cheapest compile settings (these tests compare runs with each other, never time them); and `cheap_compiles`,
the same for in-process tests."""

import os

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def subprocess_env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
                XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA_FLAGS}".strip())



@pytest.fixture(autouse=True, scope="module")
def cheap_compiles():
    """In-process: compile with XLA's cheapest settings for the importing module's tests (import it there)."""
    previous = jax.config.values.get("jax_disable_most_optimizations", False)
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
