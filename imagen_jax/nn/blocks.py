"""Residual blocks of the base U-Net (ADM/BigGAN style) and of the Efficient U-Net.

Base U-Net (Imagen App. F.1, following ADM, Dhariwal & Nichol 2021):
  ResBlock: h = conv3x3(resample(swish(GN(x))));
            h = conv3x3_0(dropout(swish(GN(h) * (1 + s) + b))),  (s, b) = Dense(swish(emb))
            out = resample(skip(x)) + h  (skip: identity, or 1x1 conv when C changes)
  `resample` is BigGAN-style up/down inside the block (avg-pool / nearest), ADM's
  resblock_updown, which Imagen's "BigGAN-style residual blocks" refers to.

Efficient U-Net (Imagen App. B.1, Figs. A.27-A.30):
  ResNetBlock (Fig. A.27): GN, swish, conv3x3, GN, swish, conv3x3, plus a 1x1 conv on the skip.
  CombineEmbs: injects the conditioning embedding (logSNR + aug_level + pooled text). The
    figures name it without its formula; we use FiLM, x * (1 + s) + b with (s, b) from a
    zero-initialised Dense(swish(emb)), the same modulation as the base U-Net's scale-shift norm.
  DBlock (Fig. A.28): strided conv3x3 (downsample FIRST) -> CombineEmbs -> ResNetBlock x N ->
    optional attention (self + text, or text only).
  UBlock (Fig. A.29): concat(x, skip / sqrt(2)) -> CombineEmbs -> ResNetBlock x N -> optional
    attention -> upsample (nearest) + conv3x3 (upsample LAST).

Every block takes `dtype`/`param_dtype`; norms run in float32. `remat=True` wraps each residual
block and attention layer in `nn.remat` (gradient checkpointing), recomputing it on backward;
`remat_policy` says what of its forward is kept (`REMAT_POLICIES`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.nn import attention, layers

Dtype = Any


# What a rematerialised block keeps from its forward for the backward pass (the paper is silent):
#   nothing        only the block's inputs; the backward recomputes the whole block (4 forward
#                  passes of work per step instead of 3, the least memory)
#   conv_outputs   also every conv's output (`layers.CONV_OUTPUT`): the backward recomputes
#                  only the norms, activations and attention around them; more memory
REMAT_POLICIES = {
    "nothing": None,
    "conv_outputs": jax.checkpoint_policies.save_only_these_names(layers.CONV_OUTPUT),
}


def check_remat_policy(policy: str) -> str:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"model.remat_policy={policy!r}; allowed: {', '.join(REMAT_POLICIES)}")
  return policy


def maybe_remat(
    module_cls, remat: bool, static_argnums: tuple[int, ...] = (), policy: str = "nothing"
):
  """`nn.remat(module_cls)` when `remat`, keeping what `policy` names (`REMAT_POLICIES`);
  static_argnums count `self` as 0 (Flax convention)."""
  if not remat:
    return module_cls
  return nn.remat(
      module_cls, static_argnums=static_argnums, policy=REMAT_POLICIES[check_remat_policy(policy)]
  )


class ResBlock(nn.Module):
  """ADM residual block with scale-shift norm and optional BigGAN up/down resampling.

  __call__(x [B,H,W,Cin], emb [B,E], train) -> [B,H',W',out_channels], H' = H, 2H or H/2.
  """

  out_channels: int
  resample: str = "none"  # "none" | "up" | "down"
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
    if self.resample not in ("none", "up", "down"):
      raise ValueError(f"ResBlock resample must be 'none', 'up' or 'down', got {self.resample!r}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    resample = {"none": lambda t: t, "up": layers.upsample_nearest, "down": layers.downsample_avg}[
        self.resample
    ]
    h = nn.swish(layers.GroupNorm(self.norm_groups, self.param_dtype)(x)).astype(self.dtype)
    h = resample(h)
    x = resample(x)
    h = layers.conv(self.out_channels, 3, **kw)(h)
    ss = layers.dense(2 * self.out_channels, ("embed", "mlp"), **kw)(nn.swish(emb))
    scale, shift = jnp.split(ss.astype(jnp.float32), 2, axis=-1)
    h = layers.GroupNorm(self.norm_groups, self.param_dtype)(h)
    h = h * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]
    h = nn.swish(h).astype(self.dtype)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = layers.conv(self.out_channels, 3, zero_init=True, **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, 1, name="skip", **kw)(x)
    return layers.constrain(x.astype(self.dtype) + h, layers.FEATURE_AXES)


class ResNetBlock(nn.Module):
  """Efficient U-Net residual block (Imagen Fig. A.27).

  out = conv1x1(x) + conv3x3(swish(GN(conv3x3(swish(GN(x))))))   [B,H,W,Cin] -> [B,H,W,C].
  The figure draws the 1x1 conv on the skip for every block, so it is always there (not only
  when the width changes, as in ADM); it is ~10% of the block's parameters.
  """

  out_channels: int
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.swish(layers.GroupNorm(self.norm_groups, self.param_dtype)(x)).astype(self.dtype)
    h = layers.conv(self.out_channels, 3, **kw)(h)
    h = nn.swish(layers.GroupNorm(self.norm_groups, self.param_dtype)(h)).astype(self.dtype)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = layers.conv(self.out_channels, 3, zero_init=True, **kw)(h)
    skip = layers.conv(self.out_channels, 1, name="skip", **kw)(x)
    return layers.constrain(skip + h, layers.FEATURE_AXES)


class CombineEmbs(nn.Module):
  """FiLM of a feature map by the conditioning embedding (our reading of Figs. A.28/A.29).

  x * (1 + s) + b, (s, b) = Dense_0(swish(emb)): [B,H,W,C], [B,E] -> [B,H,W,C]. The Dense is
  zero-initialised so the block starts unconditioned (identity).
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    c = x.shape[-1]
    ss = layers.dense(
        2 * c, ("embed", "mlp"), zero_init=True, dtype=self.dtype, param_dtype=self.param_dtype
    )(nn.swish(emb))
    scale, shift = jnp.split(ss.astype(jnp.float32), 2, axis=-1)
    out = x.astype(jnp.float32) * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]
    return out.astype(self.dtype)


class _EfficientStage(nn.Module):
  """Shared body of DBlock/UBlock: CombineEmbs -> ResNetBlock x N -> optional attention."""

  channels: int
  num_res_blocks: int
  self_attention: bool = False
  text_cross_attention: bool = False
  num_heads: int | None = None
  head_dim: int | None = None
  dropout: float = 0.0
  norm_groups: int = 32
  attn_impl: str = "auto"
  remat: bool = False
  remat_policy: str = "nothing"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def body(self, h, emb, text, text_mask, train):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = CombineEmbs(**kw)(h, emb)
    block = maybe_remat(ResNetBlock, self.remat, static_argnums=(2,), policy=self.remat_policy)
    for i in range(self.num_res_blocks):  # explicit names: independent of remat
      h = block(self.channels, self.dropout, self.norm_groups, name=f"ResNetBlock_{i}", **kw)(
          h, train
      )
    attn = maybe_remat(attention.Attention, self.remat, policy=self.remat_policy)
    heads = dict(
        num_heads=self.num_heads,
        head_dim=self.head_dim,
        norm_groups=self.norm_groups,
        impl=self.attn_impl,
    )
    # F.2 sets self_attention and text_cross_attention as two options and F.3 removes the
    # first while keeping the second, so they are two layers: self-attention over the image
    # tokens, then cross-attention from the image to the text (each with the null token).
    if self.self_attention:
      h = attn(**heads, self_attention=True, name="SelfAttention", **kw)(h, None, None)
    if self.text_cross_attention:
      h = attn(**heads, self_attention=False, name="TextCrossAttention", **kw)(h, text, text_mask)
    return h


class DBlock(_EfficientStage):
  """Efficient U-Net down block (Fig. A.28): downsample by `stride` BEFORE the convolutions.

  __call__(x [B,H,W,Cin], emb, text, text_mask, train) -> [B,H/s,W/s,channels].
  """

  stride: int = 2

  @nn.compact
  def __call__(self, x, emb, text, text_mask, train: bool = False):
    h = layers.conv(
        self.channels,
        3,
        stride=self.stride,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="down",
    )(x)
    return self.body(h, emb, text, text_mask, train)


class UBlock(_EfficientStage):
  """Efficient U-Net up block (Fig. A.29): upsample by `stride` AFTER the convolutions.

  __call__(x [B,h,w,C], skip [B,h,w,C], emb, text, text_mask, train) -> [B,sh,sw,out_channels].
  The DBlock's skip is scaled by 1/sqrt(2) (App. B.1: "scaling the skip connections by
  1/sqrt(2)") and concatenated to the input, as in a standard U-Net and imagen-pytorch; the
  first ResNetBlock's 1x1 skip conv maps the 2C channels back to C.
  """

  stride: int = 2
  out_channels: int = 0

  @nn.compact
  def __call__(self, x, skip, emb, text, text_mask, train: bool = False):
    if x.shape[:3] != skip.shape[:3]:
      raise ValueError(f"UBlock input {x.shape} and skip {skip.shape} must share B, H, W")
    h = jnp.concatenate([x, skip * (1.0 / math.sqrt(2.0))], axis=-1)
    h = self.body(h, emb, text, text_mask, train)
    if self.stride > 1:
      h = layers.upsample_nearest(h, self.stride)
    h = layers.conv(
        self.out_channels, 3, dtype=self.dtype, param_dtype=self.param_dtype, name="up"
    )(h)
    return layers.constrain(h, layers.FEATURE_AXES)
