"""Test session setup: 8 simulated host devices for mesh tests, fp32 matmuls, a CI profile."""

import os

# Must precede the first `import jax` anywhere in the session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

settings.register_profile(
    "ci",
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def tpu_compile_env(monkeypatch):
    """What topd_jax.plan.topology.compile_only_env sets for the v5e:2x2 slice, scoped to one test
    (other tests read TPU_WORKER_HOSTNAMES): libtpu compiles for the slice, no TPU is opened."""
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    monkeypatch.setenv("TPU_WORKER_ID", "0")
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                 "jax_persistent_cache_min_entry_size_bytes")


SESSION_CACHE = {name: getattr(jax.config, name) for name in CACHE_OPTIONS}  # as the session began


@pytest.fixture(autouse=True)
def no_leaked_compilation_cache():
    """A test that turns on JAX's persistent compilation cache (the protocol's `_Jobs` does, for
    its process) leaves it off again: otherwise every later test of the same worker reads that
    test's temporary cache, which crashed a worker reading an entry of another device count.
    Compared with the session's start, not the test's, so that a cache turned on outside a
    test function (a module fixture, an import) is turned off too."""
    before = SESSION_CACHE
    yield
    if any(getattr(jax.config, name) != value for name, value in before.items()):
        from jax._src import compilation_cache

        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
