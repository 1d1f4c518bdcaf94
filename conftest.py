"""Session setup shared by tests/ and notebooks/: a persistent XLA compilation cache.

Many tests build trainers, models and notebooks whose programs compile to identical XLA
modules in different processes (xdist workers, subprocess workers, notebook kernels); the cache
(keyed by the module's fingerprint, the JAX version and the flags) compiles each of them once.
It lives in the checkout (.jax_cache, ignored by git) and is inherited by every subprocess.
"""

import os

_ROOT = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
