"""Kernels that know nothing of the model. Each family has `reference.py` (plain jnp, the definition) and `api.py` (the
one entry point callers use, which runs the implementation named by its `impl` argument); all_to_all is one TPU kernel.
"""
