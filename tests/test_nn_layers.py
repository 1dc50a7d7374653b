"""Layers and attention pieces of imagen_jax.nn (small arrays, cheap compiles)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.nn import attention, layers


def test_space_to_depth_round_trip_and_layout():
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  y = layers.space_to_depth(x, 2)
  assert y.shape == (2, 2, 2, 12)
  # Channel block (dy, dx) holds pixel (2i + dy, 2j + dx).
  np.testing.assert_array_equal(y[:, 0, 1, 3:6], x[:, 0, 3, :])
  np.testing.assert_array_equal(layers.depth_to_space(y, 2), x)
  with pytest.raises(ValueError, match="must divide"):
    layers.space_to_depth(jnp.zeros((1, 6, 6, 3)), 4)


def test_resampling_shapes_and_values():
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
  up = layers.upsample_nearest(x, 2)
  assert up.shape == (1, 8, 8, 1)
  np.testing.assert_array_equal(layers.downsample_avg(up, 2), x)


def test_sinusoidal_embedding():
  e = layers.sinusoidal_embedding(jnp.array([0.0, 3.0]), 8)
  assert e.shape == (2, 8)
  np.testing.assert_allclose(e[0], [1, 1, 1, 1, 0, 0, 0, 0])
  with pytest.raises(ValueError, match="even"):
    layers.sinusoidal_embedding(jnp.zeros((2,)), 7)


@pytest.mark.parametrize("impl", ["per_example", "auto"])
def test_attention_impls_agree(impl):
  k = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(k[0], (2, 6, 2, 4))
  kk = jax.random.normal(k[1], (2, 7, 2, 4))
  v = jax.random.normal(k[2], (2, 7, 2, 4))
  mask = jnp.array([[True] * 7, [True] + [False] * 6])
  dense = attention.masked_attention(q, kk, v, mask, jnp.float32, "dense")
  other = attention.masked_attention(q, kk, v, mask, jnp.float32, impl)
  np.testing.assert_allclose(other, dense, rtol=1e-5, atol=1e-6)
  # Row 1 attends only to key 0: output is v[1, 0] for every query.
  np.testing.assert_allclose(dense[1], jnp.broadcast_to(v[1, 0], (6, 2, 4)), rtol=1e-6)


def test_attention_impl_and_heads_errors():
  with pytest.raises(ValueError, match="unknown attention impl .splash."):
    z = jnp.zeros((1, 2, 1, 2))
    attention.masked_attention(z, z, z, jnp.ones((1, 2), bool), jnp.float32, "splash")
  with pytest.raises(ValueError, match="head_dim=48 must divide"):
    attention.resolve_heads(64, None, 48)
  assert attention.resolve_heads(128, 4, 32) == (4, 32)
  assert attention.resolve_heads(1024, None, 64) == (16, 64)
  assert attention.resolve_heads(1024, 8, None) == (8, 128)
