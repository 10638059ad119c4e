"""Kernels that know nothing of the model. Each family has `reference.py` (plain jnp, the definition)
and `api.py` (the one entry point callers use, which picks an implementation by backend)."""
