"""Every test sees 8 fake CPU devices and strict rank promotion.

XLA_FLAGS must be set before jax initialises its backend, so this runs at import time of the
test session, before any test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
  del config
  assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"
