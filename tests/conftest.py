"""Puts the repository root on sys.path so tests import `dsv3_jax` and shared helpers (`tests.hf_oracle`)."""

import os
import sys

# The AOT tier (tests/aot) compiles for chips this machine lacks: the CUDA plugin must not look for a driver, and
# libtpu must load in every xdist worker. Both are read when JAX first initialises its backends.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
