"""The accelerators' attention kernels against dense attention, and the choice between them.

Pallas' TPU flash kernel runs here in its interpret mode (slow: tiny shapes); the choice of
kernel follows the platform the program is compiled for, so a TPU topology's mesh picks the
kernel on this CPU machine and the compiled TPU program contains it.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax.nn import attention

B, T, N, D = 4, 12, 2, 16
L = 5  # text tokens
S = 1 + T + L  # null + image + text keys


def inputs(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(k[0], (B, T, N, D), dtype)
  kk = jax.random.normal(k[1], (B, S, N, D), dtype)
  v = jax.random.normal(k[2], (B, S, N, D), dtype)
  # Text key padding: example i keeps i text tokens (0: the dropped text), and example 3
  # has all but the null key masked, so it attends to the null token alone.
  text = jnp.arange(L)[None] < jnp.arange(B)[:, None]
  mask = jnp.concatenate([jnp.ones((B, 1 + T), bool), text], axis=1)
  mask = mask.at[3, 1:].set(False)
  return q, kk, v, mask


def value_and_grads(impl, q, k, v, mask):
  def loss(q, k, v):
    o = attention.masked_attention(q, k, v, mask, jnp.float32, impl)
    return jnp.sum(o * jnp.cos(o)), o  # a nonlinear readout: gradients are not all equal

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def assert_matches_dense(impl, *args, wrap=None):
  dense, dense_g = value_and_grads("dense", *args)
  if wrap:
    with wrap():
      out, grads = value_and_grads(impl, *args)
  else:
    out, grads = value_and_grads(impl, *args)
  np.testing.assert_allclose(out, dense, rtol=2e-5, atol=2e-5)
  for g, ref, name in zip(grads, dense_g, "qkv"):
    np.testing.assert_allclose(g, ref, rtol=2e-4, atol=2e-5, err_msg=f"d{name}")
  # Example 3 attends to the null key alone: its output is that key's value.
  np.testing.assert_allclose(out[3], jnp.broadcast_to(args[2][3, 0], (T, N, D)), atol=1e-5)
  return grads


def test_flash_kernel_matches_dense_forward_and_gradient_with_masks():
  q, k, v, mask = inputs()
  grads = assert_matches_dense("flash", q, k, v, mask, wrap=pltpu.force_tpu_interpret_mode)
  # Masked text keys get no gradient (they had zero weight).
  np.testing.assert_array_equal(grads[1][1, 1 + T + 1 :], 0.0)


def test_flash_kernel_under_shard_map_over_the_batch_axes():
  mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("activation_batch", "data"), ("activation_heads", "tensor"))
  q, k, v, mask = inputs()
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731
  args = tuple(map(put, (q, k, v, mask)))

  def run(impl):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jax.jit(lambda *a: value_and_grads(impl, *a))(*args)

  dense, dense_g = run("dense")
  with pltpu.force_tpu_interpret_mode(), attention.recording() as seen:
    out, grads = run("flash")
  assert seen == ["flash"]
  np.testing.assert_allclose(out, dense, rtol=2e-5, atol=2e-5)
  for g, ref in zip(grads, dense_g):
    np.testing.assert_allclose(g, ref, rtol=2e-4, atol=2e-5)


def test_dot_product_attention_matches_dense_forward_and_gradient():
  assert_matches_dense("dot_product", *inputs())
  with attention.recording() as seen:
    value_and_grads("dot_product", *inputs())
  assert seen == ["dot_product(xla)"]  # cuDNN only when compiling for a GPU


def test_auto_follows_the_target_platform():
  assert attention.resolve_impl("auto", 1024, 1153, "tpu") == "flash"
  assert attention.resolve_impl("auto", 1024, 1153, "gpu") == "dot_product"
  assert attention.resolve_impl("dense", 1024, 1153, "tpu") == "dense"
  # On CPU the 8 test devices keep it dense; the loop is for one CPU device.
  assert attention.resolve_impl("auto", 1024, 1153, "cpu") == "dense"
  assert attention.target_platform() == "cpu"
  with pytest.raises(ValueError, match="unknown attention impl 'splash'"):
    attention.resolve_impl("splash", 1, 1)


@pytest.fixture(scope="module")
def tpu_mesh():
  from imagen_jax.parallel import aot

  topology = aot.parse_topology("v5p-8")
  return aot.make_mesh({"data": -1}, aot.topology_devices(topology))


def test_tpu_target_compiles_the_flash_kernel_on_this_cpu(tpu_mesh):
  """Traced on CPU for a TPU topology: `auto` is the Pallas kernel, which is in the compiled
  TPU program (a Mosaic `tpu_custom_call`: forward, dK/dV and dQ kernels)."""
  rules = (("activation_batch", "data"),)
  sharded = NamedSharding(tpu_mesh, P("data"))
  shapes = [(8, 64, 2, 64), (8, 80, 2, 64), (8, 80, 2, 64), (8, 80)]
  dtypes = [jnp.bfloat16] * 3 + [jnp.bool_]
  args = [jax.ShapeDtypeStruct(s, d, sharding=sharded) for s, d in zip(shapes, dtypes)]

  def loss(q, k, v, mask):
    with nn.logical_axis_rules(rules):
      o = attention.masked_attention(q, k, v, mask, jnp.bfloat16, "auto")
    return jnp.sum(o.astype(jnp.float32) ** 2)

  with jax.set_mesh(tpu_mesh), attention.recording() as seen:
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args)
  assert seen == ["flash"]
  compiled = lowered.compile()
  assert compiled.as_text().count("tpu_custom_call") >= 3, "forward + two backward kernels"
  # XLA's cost analysis counts the forward kernel (its cost estimate) but not the two
  # backward kernels' 7 matmuls: what `nn.flops.kernel_train_flops` adds for the roofline.
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  (b, t, n, d), s = shapes[0], shapes[1][1]
  core = 2 * (2 * b * n * t * s * d) / tpu_mesh.size  # q k^T and p v, per chip
  # 1.6 here: the kernel's keys are padded from 80 to 128 lanes; counting the backward too
  # would give 1.6 x (1 + 3.5).
  assert 0.9 < cost["flops"] / core < 2.0, cost["flops"] / core
