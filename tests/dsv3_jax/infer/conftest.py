"""The inference tests compare results, never time them: compile with XLA's cheapest settings."""

from tests.fast_compile import cheap_compiles  # noqa: F401  (an autouse fixture)
