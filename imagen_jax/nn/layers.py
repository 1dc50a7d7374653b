"""Small building layers shared by the U-Nets: convs, dense, norms, resampling, embeddings.

Every parameter created here carries logical axis names (`nn.with_logical_partitioning`), so a
config's logical->mesh rules can shard it. The names used (DESIGN.md, interfaces.md):

  conv kernels       (None, None, "conv_in", "conv_out")     [kh, kw, C_in, C_out]
  conv biases        ("conv_out",)
  dense kernels      caller-chosen pair, e.g. ("embed", "mlp")
  norm scale / bias  ("norm",)                               small vectors, normally replicated

Activations have their own names (`activation_*`, the `*_AXES` tuples below), disjoint from the
param names, so one rules table maps both without depending on rule order (configs/common.py).

dtype policy (DESIGN.md principle 9): `dtype` is the compute dtype, `param_dtype` the storage
dtype. Norm statistics and the conditioning MLPs' sinusoids are computed in float32.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Dtype = Any

# Activation layout of every feature map in the networks: NHWC, which is also the layout XLA's
# CPU and TPU convolutions prefer (no transposes around the convs). [B, H, W, C]
FEATURE_AXES = ("activation_batch", "activation_height", "activation_width", "activation_embed")
# Attention queries / keys / values [B, T, N, D] (T: image tokens, or image + text tokens).
HEAD_AXES = ("activation_batch", None, "activation_heads", "activation_kv")
# Text sequences [B, L, D] (encoder output, or its projection to the network's width).
TEXT_AXES = ("activation_batch", "activation_length", "activation_text_embed")
# The conditioning vector [B, E] (logSNR + aug_level + pooled text): small, whole per example.
COND_AXES = ("activation_batch", None)
# The name of every conv's output, for remat policies that keep it (blocks.REMAT_POLICIES).
CONV_OUTPUT = "conv_output"


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint on an activation (a no-op without rules and a mesh).

  The rules in effect must name only axes of the current mesh
  (`parallel.sharding.rules_for_mesh`); names without a rule leave that dim unsplit.
  """
  return nn.with_logical_constraint(x, tuple(names))


class Conv(nn.Conv):
  """`nn.Conv` whose input and output feature maps keep the activation layout (FEATURE_AXES).

  Without these constraints XLA's partitioner may meet a conv kernel split over fsdp by
  all-gathering the activations over the batch (the whole batch, 1/fsdp of the output
  channels, on every device) instead of all-gathering the kernel: at 256 devices that is a
  256x larger input per device. Pinned on both sides, the kernel is what moves (ZeRO-3).
  Same class name as flax's, so the param tree (`Conv_0/kernel`) is unchanged. The output is
  named `CONV_OUTPUT` for remat policies (`blocks.REMAT_POLICIES`); outside remat the name is
  a no-op.
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    y = super().__call__(constrain(inputs, FEATURE_AXES))
    return constrain(checkpoint_name(y, CONV_OUTPUT), FEATURE_AXES)


def conv(
    features: int,
    kernel: int = 3,
    stride: int = 1,
    *,
    zero_init: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
  """A `kernel x kernel` NHWC convolution with symmetric padding `kernel // 2`.

  With stride s and even input sizes the output is exactly `H / s` (like PyTorch's padding=1),
  unlike "SAME", which pads asymmetrically for strided convs. `zero_init` zeroes the kernel
  (ADM's zero_module on the last conv of a residual branch, so each block starts as identity).
  """
  kernel_init = (
      nn.initializers.zeros_init()
      if zero_init
      else nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
  )
  pad = kernel // 2
  return Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, "conv_in", "conv_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
      name=name,
  )


def dense(
    features: int,
    names: tuple[str | None, str | None],
    *,
    zero_init: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
  """A Dense layer whose kernel `[in, out]` carries the logical names `names`."""
  kernel_init = (
      nn.initializers.zeros_init()
      if zero_init
      else nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
  )
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names[1],)),
      name=name,
  )


class DenseGeneral(nn.Module):
  """Dense map contracting the last `in_axes` axes of x onto `features` axes.

  y[..., f] = sum_i x[..., i] W[i, f] + b[f],  W: [*in_dims, *features] with logical `names`.
  Unlike flax's DenseGeneral, the kernel is initialised in its final shape, so its logical
  partitioning (and the sharding constraint it implies under a mesh) applies to the real
  array (flax initialises a flattened 2-D kernel and reshapes it afterwards).
  """

  features: tuple[int, ...]
  names: tuple[str | None, ...]
  in_axes: int = 1
  zero_init: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in, n_out = self.in_axes, len(self.features)
    if len(self.names) != n_in + n_out:
      raise ValueError(
          f"DenseGeneral names {self.names} must name {n_in} input and " f"{n_out} output axes"
      )
    kshape = tuple(x.shape[x.ndim - n_in :]) + tuple(self.features)
    init = (
        nn.initializers.zeros_init()
        if self.zero_init
        else nn.initializers.variance_scaling(
            1.0,
            "fan_avg",
            "uniform",
            in_axis=tuple(range(n_in)),
            out_axis=tuple(range(n_in, n_in + n_out)),
        )
    )
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(init, self.names), kshape, self.param_dtype
    )
    bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), self.names[n_in:]),
        tuple(self.features),
        self.param_dtype,
    )
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    lead = y.ndim - n_out
    return y + bias.astype(self.dtype).reshape((1,) * lead + tuple(self.features))


def num_groups_for(channels: int, max_groups: int = 32) -> int:
  """Largest group count <= max_groups that divides `channels` (32 for every paper width)."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  raise ValueError(f"channels must be positive, got {channels}")


class GroupNorm(nn.Module):
  """GroupNorm computed in float32 (statistics and affine), returned in float32.

  Callers cast to the compute dtype after any scale-shift, so the modulation is float32 too.
  """

  max_groups: int = 32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.GroupNorm(
        num_groups=num_groups_for(x.shape[-1], self.max_groups),
        epsilon=1e-5,
        dtype=jnp.float32,
        param_dtype=self.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
    )(x.astype(jnp.float32))


class LayerNorm(nn.Module):
  """LayerNorm over the last axis in float32 (used on text embeddings, Imagen §2.5)."""

  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.LayerNorm(
        epsilon=1e-5,
        dtype=jnp.float32,
        param_dtype=self.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
    )(x.astype(jnp.float32))


def downsample_avg(x: jax.Array, factor: int = 2) -> jax.Array:
  """Average-pool by `factor` (BigGAN/ADM resblock downsampling). [B,H,W,C] -> [B,H/f,W/f,C]."""
  b, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f"cannot downsample {h}x{w} by {factor}: sizes must be divisible")
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
  """Nearest-neighbour upsampling. [B,H,W,C] -> [B,fH,fW,C]."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
  return x.reshape(b, h * factor, w * factor, c)


def space_to_depth(x: jax.Array, factor: int) -> jax.Array:
  """Pixel-unshuffle. [B,H,W,C] -> [B,H/f,W/f,f*f*C] (channel order: (dy, dx, c))."""
  b, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f"space_to_depth factor {factor} must divide the image size {h}x{w}")
  x = x.reshape(b, h // factor, factor, w // factor, factor, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // factor, w // factor, factor * factor * c)


def depth_to_space(x: jax.Array, factor: int) -> jax.Array:
  """Pixel-shuffle, the inverse of `space_to_depth`. [B,h,w,f*f*C] -> [B,fh,fw,C]."""
  b, h, w, c = x.shape
  if c % (factor * factor):
    raise ValueError(f"depth_to_space factor {factor}: channels {c} not divisible by {factor**2}")
  c_out = c // (factor * factor)
  x = x.reshape(b, h, w, factor, factor, c_out).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * factor, w * factor, c_out)


def sinusoidal_embedding(x: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Transformer sinusoidal features of a scalar per example, float32. [B] -> [B, dim].

  emb = [cos(x * f_k), sin(x * f_k)], f_k = max_period^(-k / (dim/2)), k = 0..dim/2-1.
  """
  if dim % 2:
    raise ValueError(f"sinusoidal embedding dim must be even, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = x.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def logsnr_to_unit(logsnr: jax.Array) -> jax.Array:
  """Bounded, monotone transform of logSNR to (0, 1): u = (2/pi) * arctan(exp(-logsnr / 2)).

  Our choice (the paper conditions on t, App. A, but the denoiser contract passes logSNR so that
  every schedule shares one network input). u is exactly t of the cosine schedule with unbounded
  endpoints (logsnr = -2 log tan(pi t / 2)), so a cosine-trained network sees the usual t;
  u -> 0 as logsnr -> +inf (clean) and u -> 1 as logsnr -> -inf (pure noise). Clipping logsnr
  to +-80 keeps exp finite in float32 without changing u (already within 1e-17 of its limit).
  """
  logsnr = jnp.clip(logsnr.astype(jnp.float32), -80.0, 80.0)
  return (2.0 / math.pi) * jnp.arctan(jnp.exp(-0.5 * logsnr))


class ScalarEmbedding(nn.Module):
  """MLP on sinusoidal features of a scalar in [0, 1] (ADM's time embedding).

  e = Dense(swish(Dense(sinusoid(1000 * u, dim_in)))), shapes [B] -> [B, embed_dim].
  Used for the logSNR (through `logsnr_to_unit`) and for the SR aug_level (Imagen §2.4, D.2).
  The 1000x scale matches DDPM/ADM's integer timesteps, so the sinusoid's frequencies span
  the unit interval usefully.
  """

  embed_dim: int
  sinusoid_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, u: jax.Array) -> jax.Array:
    if u.ndim != 1:
      raise ValueError(f"expected a [B] vector of per-example scalars, got shape {u.shape}")
    h = sinusoidal_embedding(1000.0 * u, self.sinusoid_dim)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.embed_dim, ("embed", "mlp"), **kw)(h)
    h = nn.swish(h)
    return dense(self.embed_dim, ("mlp", "embed"), **kw)(h)
