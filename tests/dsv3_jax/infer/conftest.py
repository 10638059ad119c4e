"""The inference tests compare results, never time them: compile with XLA's cheapest settings."""

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _cheap_compiles():
    previous = jax.config.values.get("jax_disable_most_optimizations", False)
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
