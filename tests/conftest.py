"""Every test sees 8 fake CPU devices and strict rank promotion; tests that start several JAX
processes run one at a time.

XLA_FLAGS must be set before jax initialises its backend, so this runs at import time of the
test session, before any test module imports jax.
"""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache per test run, shared by the xdist workers and every process
# a test starts (they inherit the environment): many tests compile the same tiny programs, and a
# compile costs seconds to a minute on 2 cores. Set by the first process (the controller) before
# the workers start; a max size turns on jax's file lock between concurrent readers and writers.
_OWN_CACHE = None
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="imagen_jax_test_jit_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
  del config
  assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"


def pytest_collection_modifyitems(config, items):
  """Every `multihost` test (several JAX processes on 127.0.0.1) joins one xdist group, so under
  `pytest -n 2 --dist loadgroup` they run one after another on one worker: two of them at once
  would put four compiling processes on two cores, and a process that reaches its first
  collective late fails XLA's 30 s gloo deadline (`parallel.ready` covers what remains)."""
  del config
  for item in items:
    if item.get_closest_marker("multihost") is not None:
      item.add_marker(pytest.mark.xdist_group("multihost"))


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE is not None:  # the controller made it; the workers have ended by now
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
