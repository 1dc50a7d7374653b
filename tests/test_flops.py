"""Model FLOPs counted layer by layer (`nn.flops`) against XLA's own count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import base64
from imagen_jax.nn import attention, flops
from imagen_jax.stage import Stage


def xla_flops(fn, *args) -> float:
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def conv(x, w, padding):
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def test_matmul_and_valid_conv_match_xla_exactly():
  x, w = jnp.zeros((2, 6, 6, 3)), jnp.zeros((3, 3, 3, 5))
  a, b = jnp.zeros((4, 7, 2, 8)), jnp.zeros((4, 9, 2, 8))
  attn = lambda q, k: jnp.einsum("btnd,bsnd->bnts", q, k)  # noqa: E731
  assert flops.count(lambda x, w: conv(x, w, "VALID"), x, w).conv == 2 * (2 * 4 * 4 * 5) * 27
  assert flops.count(lambda x, w: conv(x, w, "VALID"), x, w).total == xla_flops(
      lambda x, w: conv(x, w, "VALID"), x, w
  )
  assert flops.count(attn, a, b).dense == 2 * 4 * 2 * 7 * 9 * 8 == xla_flops(attn, a, b)


def test_same_padding_counts_the_whole_kernel_where_xla_skips_the_border():
  """The model-FLOPs convention counts every tap; XLA leaves out the taps that fall on the
  zero padding (here 100 of 144 taps land inside a 4x4 image)."""
  x, w = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 5))
  same = lambda x, w: conv(x, w, "SAME")  # noqa: E731
  assert flops.count(same, x, w).conv == 2 * 16 * 9 * 2 * 5
  assert xla_flops(same, x, w) == 2 * 100 * 2 * 5


def test_scan_counts_every_step_cond_its_costliest_branch_while_is_refused():
  m = jnp.zeros((3, 4, 4))
  per = flops.count(lambda a: a[0] @ a[0], m).total
  scanned = lambda a: jax.lax.scan(lambda c, x: (c, x @ x), 0.0, a)[1]  # noqa: E731
  assert flops.count(scanned, m).total == 3 * per
  cond = lambda p, a: jax.lax.cond(p, lambda: a[0] @ a[0] @ a[0], lambda: a[0])  # noqa: E731
  assert flops.count(cond, True, m).total == 2 * per
  loop = lambda a: jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ c[0], c[1] + 1), (a[0], 0))  # noqa: E731
  with pytest.raises(ValueError, match="while loop"):
    flops.count(loop, m)


def test_attention_matmuls_are_told_apart_by_their_module():
  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Dense(8, name="Attention_0")(x)
      return nn.Dense(4)(x)

  x = jnp.zeros((2, 16))
  p = jax.eval_shape(Net().init, jax.random.key(0), x)
  c = flops.count(Net().apply, p, x)
  assert (c.attention, c.dense, c.conv) == (2 * 2 * 16 * 8, 2 * 2 * 8 * 4, 0)


def test_attention_core_is_what_a_kernel_computes():
  # softmax(q k^T) v: 2 matmuls of 2 * B * N * T * S * D FLOPs each, counted apart as the
  # core (its kind follows the enclosing module: none here, so dense).
  b, t, s, n, d = 2, 16, 24, 3, 8
  q, kv = jnp.zeros((b, t, n, d)), jnp.zeros((b, s, n, d))
  mask = jnp.ones((b, s), bool)
  c = flops.count(lambda q, k, v: attention.masked_attention(q, k, v, mask, jnp.float32), q, kv, kv)
  assert c.attention_core == c.dense == 2 * (2 * b * n * t * s * d)
  # The flash kernel's backward (XLA counts its forward): 7 matmuls of the forward's 2.
  assert flops.kernel_train_flops(c) == 3.5 * c.attention_core


def test_tiny_network_forward_and_train_step_against_xla():
  """A small dense configuration without remat: the count is XLA's conv + matmul work, up to
  the border taps XLA does not count (4x4 to 16x16 feature maps here: a few percent) and the
  elementwise work it does count. A train step (gradient) is 3 x the forward."""
  config = base64.get_config("tiny")
  config.model.attn_impl, config.model.remat = "dense", False
  stage = Stage.from_config(config)
  inputs = stage.model_inputs(1)
  count = flops.network_forward_flops(config.model, inputs)
  assert count.conv > 0 and count.attention > 0 and count.dense > 0
  assert 0 < count.attention_core < count.attention  # the projections are the rest
  params = stage.abstract_params()

  def forward(p, i):
    i = dict(i)
    args = (i.pop("x_t"), i.pop("logsnr"), i.pop("text_emb"), i.pop("text_mask"))
    return stage.model.apply({"params": p}, *args, train=False, **i)

  fwd = xla_flops(forward, params, inputs)
  grad = xla_flops(jax.grad(lambda p, i: jnp.sum(forward(p, i) ** 2)), params, inputs)
  assert 0.93 < fwd / count.total < 1.0, (fwd, count)
  assert 0.93 < grad / (flops.TRAIN_FACTOR * count.total) < 1.0, (grad, count)
