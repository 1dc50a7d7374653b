"""The denoising networks: base U-Net (Imagen App. F.1) and Efficient U-Net (App. B.1, F.2, F.3).

Both share one call signature (docs/interfaces.md):
  model.apply(params, x_t, logsnr, text_emb, text_mask, lowres=None, aug_level=None,
              train=False, rngs=...) -> [B, H, W, out_channels] float32
  x_t [B,H,W,C] noisy image; logsnr [B]; text_emb [B,L,D]; text_mask bool [B,L];
  lowres [B,H,W,C] (SR only) the low-res image, upsampled to x_t's size and noise-augmented;
  aug_level [B] in [0, 1] (SR only). The output is the raw prediction in the stage's target
  space (eps, v or x0: the network does not know which).

`build_model(model_config)` picks the class from `model_config.kind` ("unet" |
"efficient_unet"; the configs come from `presets.get_model_config`), or "deepfloyd": a published
DeepFloyd IF U-Net behind the same call (`deepfloyd.IFDenoiser`, built from the diffusers
folder `model_config.path`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from imagen_jax import dtypes
from imagen_jax.nn import attention, blocks, deepfloyd, layers, text_conditioning

Dtype = Any


def _check_inputs(x_t, lowres, lowres_cond: bool):
  if x_t.ndim != 4:
    raise ValueError(f"x_t must be [B, H, W, C], got shape {x_t.shape}")
  if lowres_cond:
    if lowres is None:
      raise ValueError(
          "this super-resolution network (lowres_cond=True) needs `lowres`, the "
          "low-res image upsampled to x_t's size"
      )
    if lowres.shape[:3] != x_t.shape[:3]:
      raise ValueError(f"lowres {lowres.shape} must be upsampled to x_t's size {x_t.shape}")
    return jnp.concatenate([x_t, lowres.astype(x_t.dtype)], axis=-1)
  if lowres is not None:
    raise ValueError("lowres given to a network built with lowres_cond=False")
  return x_t


class UNet(nn.Module):
  """ADM-style U-Net, the Imagen base 64x64 model (App. F.1, D.3.1).

  in conv3x3 -> per level l (width base_channels * channel_mult[l]):
    [ResBlock (+ Attention if the resolution is in attn_resolutions)] x num_res_blocks,
    then a BigGAN down-ResBlock (except the last level)
  -> middle: ResBlock, Attention, ResBlock
  -> per level reversed: [concat skip, ResBlock (+ Attention)] x (num_res_blocks + 1),
    then a BigGAN up-ResBlock (except the first level)
  -> GN, swish, conv3x3 (zero-init) -> out_channels.
  Every attention layer also attends to the text sequence when `text_cross_attention`.
  Resolutions in `attn_resolutions` are pixel sizes (32, 16, 8 for a 64x64 input).
  """

  base_channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  num_heads: int | None
  head_dim: int | None
  embed_dim: int
  text_proj_dim: int | None
  pool_heads: int
  text_positions: bool = False
  text_cross_attention: bool = True
  out_channels: int = 3
  lowres_cond: bool = False
  dropout: float = 0.0
  norm_groups: int = 32
  attn_impl: str = "auto"
  remat: bool = False
  remat_policy: str = "nothing"  # blocks.REMAT_POLICIES
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x_t, logsnr, text_emb, text_mask, lowres=None, aug_level=None, train: bool = False
  ):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _check_inputs(x_t, lowres, self.lowres_cond)
    emb, text, mask = text_conditioning.Conditioning(
        self.embed_dim,
        self.base_channels,
        self.text_proj_dim,
        self.pool_heads,
        use_aug_level=self.lowres_cond,
        text_positions=self.text_positions,
        name="conditioning",
        **kw,
    )(logsnr, text_emb, text_mask, aug_level)
    text_kv = (text, mask) if self.text_cross_attention else (None, None)

    policy = self.remat_policy
    res_block = blocks.maybe_remat(blocks.ResBlock, self.remat, static_argnums=(3,), policy=policy)
    attn = blocks.maybe_remat(attention.Attention, self.remat, policy=policy)

    # Explicit names: nn.remat would otherwise rename the submodules (CheckpointResBlock_0),
    # and the param tree must not depend on the remat setting.
    counts = {"res": 0, "att": 0}

    def res(ch, h, resample="none"):
      name = f"ResBlock_{counts['res']}"
      counts["res"] += 1
      return res_block(ch, resample, self.dropout, self.norm_groups, name=name, **kw)(h, emb, train)

    def att(h):
      name = f"Attention_{counts['att']}"
      counts["att"] += 1
      return attn(
          self.num_heads,
          self.head_dim,
          norm_groups=self.norm_groups,
          impl=self.attn_impl,
          name=name,
          **kw,
      )(h, *text_kv)

    size = x.shape[1]
    h = layers.conv(self.base_channels, 3, name="conv_in", **kw)(x.astype(self.dtype))
    h = layers.constrain(h, layers.FEATURE_AXES)
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = res(self.base_channels * mult, h)
        if size in self.attn_resolutions:
          h = att(h)
        skips.append(h)
      if level != len(self.channel_mult) - 1:
        h = res(h.shape[-1], h, "down")
        size //= 2
        skips.append(h)

    h = res(h.shape[-1], h)
    h = att(h)
    h = res(h.shape[-1], h)

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(self.base_channels * mult, h)
        if size in self.attn_resolutions:
          h = att(h)
        if level and i == self.num_res_blocks:
          h = res(h.shape[-1], h, "up")
          size *= 2
    assert not skips, "U-Net skip bookkeeping is off"

    h = nn.swish(layers.GroupNorm(self.norm_groups, self.param_dtype)(h)).astype(self.dtype)
    out = layers.conv(self.out_channels, 3, zero_init=True, name="conv_out", **kw)(h)
    return out.astype(jnp.float32)


class EfficientUNet(nn.Module):
  """Efficient U-Net for the super-resolution stages (App. B.1; F.2 = SR256, F.3 = SR1024).

  concat(x_t, lowres) -> [space_to_depth(f)] -> conv3x3 stem (stem_channels)
  -> DBlock_i (channels[i], stride[i], num_res_blocks[i]) for i = 0..n-1   (skips kept)
  -> UBlock_i for i = n-1..0 (out width channels[i-1], stem_channels for i = 0)
  -> GN, swish, conv3x3 (zero-init) -> [depth_to_space(f)] -> out_channels.
  There is no middle block: the last DBlock feeds the last UBlock (Fig. A.30 shows none).
  `space_to_depth` (our extension, not in the paper) runs the whole network at 1/f resolution
  with f*f more input channels, a cheap stem for small CPU demos; 1 disables it.
  """

  channels: Sequence[int]
  num_res_blocks: Sequence[int]
  strides: Sequence[int]
  self_attention: Sequence[bool]
  text_cross_attention: Sequence[bool]
  stem_channels: int
  num_heads: int | None
  head_dim: int | None
  embed_dim: int
  text_proj_dim: int | None
  pool_heads: int
  text_positions: bool = False
  out_channels: int = 3
  lowres_cond: bool = True
  space_to_depth: int = 1
  dropout: float = 0.0
  norm_groups: int = 32
  attn_impl: str = "auto"
  remat: bool = False
  remat_policy: str = "nothing"  # blocks.REMAT_POLICIES
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x_t, logsnr, text_emb, text_mask, lowres=None, aug_level=None, train: bool = False
  ):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n = len(self.channels)
    for field in ("num_res_blocks", "strides", "self_attention", "text_cross_attention"):
      if len(getattr(self, field)) != n:
        raise ValueError(
            f"EfficientUNet.{field} has {len(getattr(self, field))} entries, "
            f"channels has {n}; give one per block"
        )
    x = _check_inputs(x_t, lowres, self.lowres_cond)
    f = self.space_to_depth
    if f > 1:
      x = layers.space_to_depth(x, f)
    emb, text, mask = text_conditioning.Conditioning(
        self.embed_dim,
        self.stem_channels,
        self.text_proj_dim,
        self.pool_heads,
        use_aug_level=self.lowres_cond,
        text_positions=self.text_positions,
        name="conditioning",
        **kw,
    )(logsnr, text_emb, text_mask, aug_level)

    common = dict(
        num_heads=self.num_heads,
        head_dim=self.head_dim,
        dropout=self.dropout,
        norm_groups=self.norm_groups,
        attn_impl=self.attn_impl,
        remat=self.remat,
        remat_policy=self.remat_policy,
        **kw,
    )
    h = layers.conv(self.stem_channels, 3, name="stem", **kw)(x.astype(self.dtype))
    h = layers.constrain(h, layers.FEATURE_AXES)
    skips = []
    for i in range(n):
      h = blocks.DBlock(
          self.channels[i],
          self.num_res_blocks[i],
          self.self_attention[i],
          self.text_cross_attention[i],
          stride=self.strides[i],
          name=f"DBlock_{i}",
          **common,
      )(h, emb, text, mask, train)
      skips.append(h)
    for i in reversed(range(n)):
      out_ch = self.channels[i - 1] if i else self.stem_channels
      h = blocks.UBlock(
          self.channels[i],
          self.num_res_blocks[i],
          self.self_attention[i],
          self.text_cross_attention[i],
          stride=self.strides[i],
          out_channels=out_ch,
          name=f"UBlock_{i}",
          **common,
      )(h, skips[i], emb, text, mask, train)
    h = nn.swish(layers.GroupNorm(self.norm_groups, self.param_dtype)(h)).astype(self.dtype)
    out = layers.conv(self.out_channels * f * f, 3, zero_init=True, name="conv_out", **kw)(h)
    if f > 1:
      out = layers.depth_to_space(out, f)
    return out.astype(jnp.float32)


def build_model(model_config: ml_collections.ConfigDict) -> nn.Module:
  """UNet or EfficientUNet from a `presets.get_model_config(...)` ConfigDict."""
  c = model_config
  common = dict(
      num_heads=c.num_heads,
      head_dim=c.head_dim,
      embed_dim=c.embed_dim,
      text_proj_dim=c.text_proj_dim,
      pool_heads=c.pool_heads,
      # .get: a saved config may lack the field; absent means off (the paper's networks).
      text_positions=bool(c.get("text_positions", False)),
      out_channels=c.out_channels,
      lowres_cond=c.lowres_cond,
      dropout=c.dropout,
      norm_groups=c.norm_groups,
      attn_impl=c.attn_impl,
      remat=c.remat,
      # .get: a saved config may lack the field; absent means the full recompute.
      remat_policy=blocks.check_remat_policy(c.get("remat_policy", "nothing")),
      dtype=dtypes.get_dtype(c.dtype, "model.dtype"),
      param_dtype=dtypes.get_dtype(c.param_dtype, "model.param_dtype"),
  )
  if c.kind == "unet":
    return UNet(
        base_channels=c.base_channels,
        channel_mult=tuple(c.channel_mult),
        num_res_blocks=c.num_res_blocks,
        attn_resolutions=tuple(c.attn_resolutions),
        text_cross_attention=c.text_cross_attention,
        **common,
    )
  if c.kind == "efficient_unet":
    return EfficientUNet(
        channels=tuple(c.channels),
        num_res_blocks=tuple(c.num_res_blocks),
        strides=tuple(c.strides),
        self_attention=tuple(c.self_attention),
        text_cross_attention=tuple(c.text_cross_attention),
        stem_channels=c.stem_channels,
        space_to_depth=c.space_to_depth,
        **common,
    )
  if c.kind == "deepfloyd":  # a published DeepFloyd IF U-Net (reads its folder's config.json)
    return deepfloyd.build_denoiser(c)
  raise ValueError(f"unknown model kind {c.kind!r}; allowed: 'unet', 'efficient_unet', 'deepfloyd'")
