"""DeepFloyd IF's pixel U-Nets (IF-I, IF-II) in Flax: what diffusers' `UNet2DConditionModel`
computes for IF's `config.json` (`deepfloyd_config.IFConfig`), NHWC.

  t_emb = Dense_2(act(Dense_1(sinusoid(t, C0))))                         [B, E]  (time)
        + Dense_2'(act(Dense_1'(sinusoid(noise_level, C0))))              (IF-II: class_embed)
        + LN(Dense(AttnPool(LN(text))))                                   (addition_embed "text")
  emb   = act_t(t_emb)                                                    (time_embedding_act_fn)
  text' = Dense(text)                  [B, L, D] -> [B, L, cross_attention_dim] (encoder_hid_proj)
  h = conv_in(x) -> down blocks [ResBlock (+ Attention)] x n, ResBlock(down)
    -> mid: ResBlock, Attention, ResBlock -> up blocks [concat skip, ResBlock (+ Attention)]
    x (n + 1), ResBlock(up) -> GN, act, conv_out -> [B, H, W, out_channels]

ResBlock (diffusers `ResnetBlock2D`): h = conv1(resample(act(GN(x)))); with
`resnet_time_scale_shift="scale_shift"` h = GN(h) * (1 + s) + b, (s, b) = Dense(emb) (no act on
emb when `resnet_skip_time_act`); out = (resample(shortcut(x)) + conv2(act(h))) /
`output_scale_factor`. Resampling is nearest-up / average-pool-down (BigGAN style, like ours).

Attention (diffusers `Attention` + `AttnAddedKVProcessor`): q = Dense(GN(x)); keys / values are
the projected text tokens (add_k_proj / add_v_proj of text', first normalised by
`norm_cross` = GroupNorm(32) over its channels with `cross_attention_norm="group_norm"`, as in
IF's published U-Nets: the `norm_encoder` of IF's own code) joined to the image tokens'
(to_k / to_v; none when only_cross_attention); out = x + to_out(softmax(q k^T / sqrt(d)) v).
A text mask, when given, removes padded text tokens (diffusers' `encoder_attention_mask`); IF's
own pipeline passes none, attending to all L tokens.

Param names follow diffusers' module names with `.k` -> `_k` (`down_blocks.0.resnets.1.conv1`
is `down_blocks_0_resnets_1/conv1`), so `deepfloyd_checkpoint` maps a diffusers tensor name to
its param by rule. Logical axis names
are our U-Nets' (docs/interfaces.md); `dtype` is the compute dtype, norms and softmax float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax import dtypes, paths
from imagen_jax.diffusion import discrete, schedules
from imagen_jax.nn import attention, blocks, layers
from imagen_jax.nn.deepfloyd_config import CROSS_NORM_GROUPS, IFConfig, read_config

Dtype = Any


def activation(name: str | None):
  """diffusers' `get_activation`: exact (erf) GELU, or SiLU."""
  if name is None:
    return lambda x: x
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  return nn.swish


def timestep_sinusoid(
    t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
  """diffusers `get_timestep_embedding`, float32. t: [B] (integer or continuous) -> [B, dim].

  f_k = exp(-ln(max_period) k / (dim/2 - freq_shift)); emb = [sin(t f), cos(t f)], or
  [cos, sin] when `flip_sin_to_cos` (IF: flipped, shift 0).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def group_norm(x, groups: int, eps: float, param_dtype, name: str) -> jax.Array:
  """torch GroupNorm(groups, C, eps) in float32; params `scale`, `bias` ("norm")."""
  return nn.GroupNorm(
      num_groups=groups,
      epsilon=eps,
      dtype=jnp.float32,
      param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
      name=name,
  )(x.astype(jnp.float32))


def layer_norm(x, param_dtype, name: str) -> jax.Array:
  """torch LayerNorm(D) (eps 1e-5) over the last axis, float32."""
  return nn.LayerNorm(
      epsilon=1e-5,
      dtype=jnp.float32,
      param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
      name=name,
  )(x.astype(jnp.float32))


class TimestepEmbedding(nn.Module):
  """diffusers `TimestepEmbedding`: linear_2(act(linear_1(x))). [B, C0] -> [B, E]."""

  features: int
  act_fn: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.dense(self.features, (None, "mlp"), name="linear_1", **kw)(x.astype(self.dtype))
    h = activation(self.act_fn)(h)
    return layers.dense(self.features, ("mlp", "embed"), name="linear_2", **kw)(h)


class AttentionPooling(nn.Module):
  """IF's attention pooling (diffusers `AttentionPooling`): a mean-token query attends to
  [mean-token; tokens]. x: [B, L, D] -> [B, D] (heads of D / num_heads channels)."""

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, _, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"addition_embed_type_num_heads={self.num_heads} must divide D={d}")
    dh = d // self.num_heads
    pos = self.param(
        "positional_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(d**-0.5), (None, "text_embed")),
        (1, d),
        self.param_dtype,
    )
    x = x.astype(self.dtype)
    cls = x.astype(jnp.float32).mean(axis=1, keepdims=True) + pos.astype(jnp.float32)[None]
    cls = cls.astype(self.dtype)
    x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + L, D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    split = lambda t: t.reshape(b, t.shape[1], self.num_heads, dh)  # noqa: E731
    q = split(layers.dense(d, ("text_embed", "heads"), name="q_proj", **kw)(cls))
    k = split(layers.dense(d, ("text_embed", "heads"), name="k_proj", **kw)(x))
    v = split(layers.dense(d, ("text_embed", "heads"), name="v_proj", **kw)(x))
    logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32) / math.sqrt(dh)
    w = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bnts,bsnd->btnd", w, v)
    return out.reshape(b, d)


class TextTimeEmbedding(nn.Module):
  """diffusers `TextTimeEmbedding`: norm2(proj(pool(norm1(text)))). [B, L, D] -> [B, E]."""

  features: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layer_norm(text, self.param_dtype, "norm1")
    h = AttentionPooling(self.num_heads, name="pool", **kw)(h)
    h = layers.dense(self.features, ("text_embed", "embed"), name="proj", **kw)(h)
    return layer_norm(h, self.param_dtype, "norm2")


class ResnetBlock(nn.Module):
  """diffusers `ResnetBlock2D` (see module doc). x: [B,H,W,Cin], emb: [B,E] -> [B,H',W',C]."""

  out_channels: int
  resample: str = "none"  # none | up | down
  groups: int = 32
  eps: float = 1e-5
  act_fn: str = "gelu"
  scale_shift: bool = True
  skip_time_act: bool = False
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = activation(self.act_fn)
    resample = {"none": lambda t: t, "up": layers.upsample_nearest, "down": layers.downsample_avg}[
        self.resample
    ]
    h = act(group_norm(x, self.groups, self.eps, self.param_dtype, "norm1")).astype(self.dtype)
    h = resample(h)
    x = resample(x)
    h = layers.conv(self.out_channels, 3, name="conv1", **kw)(h)
    t = emb if self.skip_time_act else act(emb)
    width = 2 * self.out_channels if self.scale_shift else self.out_channels
    t = layers.dense(width, ("embed", "mlp"), name="time_emb_proj", **kw)(t.astype(self.dtype))
    t = t.astype(jnp.float32)[:, None, None, :]
    if self.scale_shift:
      scale, shift = jnp.split(t, 2, axis=-1)
      h = group_norm(h, self.groups, self.eps, self.param_dtype, "norm2") * (1.0 + scale) + shift
    else:
      h = group_norm(h.astype(jnp.float32) + t, self.groups, self.eps, self.param_dtype, "norm2")
    h = act(h).astype(self.dtype)
    h = layers.conv(self.out_channels, 3, name="conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
    out = (x.astype(jnp.float32) + h.astype(jnp.float32)) / self.output_scale_factor
    return layers.constrain(out.astype(self.dtype), layers.FEATURE_AXES)


class AddedKVAttention(nn.Module):
  """diffusers `Attention(added_kv_proj_dim=...)` with `AttnAddedKVProcessor` (module doc).

  x: [B,H,W,C], text: [B,L,Dx] (projected), text_mask: bool [B,L] or None -> [B,H,W,C].
  """

  head_dim: int
  groups: int = 32
  only_cross_attention: bool = False
  impl: str = "auto"
  cross_norm: bool = False  # GroupNorm(32) on the text first (`cross_attention_norm`)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, text, text_mask=None):
    b, hgt, wid, c = x.shape
    heads, dh = c // self.head_dim, self.head_dim
    inner = heads * dh
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    split = lambda t: layers.constrain(  # noqa: E731
        t.reshape(b, t.shape[1], heads, dh), layers.HEAD_AXES
    )
    h = group_norm(x, self.groups, 1e-5, self.param_dtype, "group_norm").astype(self.dtype)
    h = h.reshape(b, hgt * wid, c)
    q = split(layers.dense(inner, ("embed", "heads"), name="to_q", **kw)(h))
    if self.cross_norm:  # diffusers' norm_cross: GroupNorm over [B, Dx, L] = ours on [B, L, Dx]
      text = group_norm(text, CROSS_NORM_GROUPS, 1e-5, self.param_dtype, "norm_cross")
    text = text.astype(self.dtype)
    ks = [split(layers.dense(inner, ("embed", "heads"), name="add_k_proj", **kw)(text))]
    vs = [split(layers.dense(inner, ("embed", "heads"), name="add_v_proj", **kw)(text))]
    if text_mask is None:
      text_mask = jnp.ones(text.shape[:2], bool)
    masks = [text_mask.astype(bool)]
    if not self.only_cross_attention:
      ks.append(split(layers.dense(inner, ("embed", "heads"), name="to_k", **kw)(h)))
      vs.append(split(layers.dense(inner, ("embed", "heads"), name="to_v", **kw)(h)))
      masks.append(jnp.ones((b, hgt * wid), bool))
    out = attention.masked_attention(
        q,
        jnp.concatenate(ks, axis=1),
        jnp.concatenate(vs, axis=1),
        jnp.concatenate(masks, axis=1),
        self.dtype,
        self.impl,
    )
    out = layers.dense(c, ("heads", "embed"), name="to_out_0", **kw)(
        out.reshape(b, hgt * wid, inner)
    )
    out = out.reshape(b, hgt, wid, c)
    return layers.constrain((x.astype(jnp.float32) + out).astype(self.dtype), layers.FEATURE_AXES)


class IFUNet(nn.Module):
  """IF-I / IF-II U-Net (module doc), native call:

  __call__(x [B,H,W,in_channels], t [B] (IF timesteps, 0..999; may be continuous),
           text [B,L,D], text_mask bool [B,L] | None, noise_level [B] | None (IF-II only))
  -> [B, H, W, out_channels] float32 (IF: eps in the first 3 channels, the learned-range
  variance interpolation v in the last 3).
  """

  config: IFConfig
  attn_impl: str = "auto"
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, t, text, text_mask=None, noise_level=None):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if x.ndim != 4 or x.shape[-1] != c.in_channels:
      raise ValueError(f"x must be [B, H, W, {c.in_channels}], got {x.shape}")
    if text.shape[-1] != c.text_dim:
      raise ValueError(f"text width {text.shape[-1]}; this network reads D={c.text_dim}")
    if c.is_sr != (noise_level is not None):
      raise ValueError(
          "IF-II (class_embed_type='timestep') needs noise_level [B]"
          if c.is_sr
          else "noise_level given to a network without class_embed_type='timestep'"
      )
    c0, e = c.block_out_channels[0], c.time_embed_dim
    sinus = lambda s: timestep_sinusoid(  # noqa: E731
        jnp.broadcast_to(s, (x.shape[0],)), c0, c.flip_sin_to_cos, c.freq_shift
    )
    emb = TimestepEmbedding(e, c.act_fn, name="time_embedding", **kw)(sinus(t))
    emb = emb.astype(jnp.float32)
    if c.is_sr:
      emb = emb + TimestepEmbedding(e, c.act_fn, name="class_embedding", **kw)(
          sinus(noise_level)
      ).astype(jnp.float32)
    if c.addition_embed_type == "text":
      emb = emb + TextTimeEmbedding(e, c.addition_embed_type_num_heads, name="add_embedding", **kw)(
          text
      )
    emb = layers.constrain(activation(c.time_embedding_act_fn)(emb), layers.COND_AXES)
    if c.encoder_hid_dim is not None:
      text = layers.dense(
          c.cross_attention_dim, ("text_embed", "embed"), name="encoder_hid_proj", **kw
      )(text.astype(self.dtype))
    text = layers.constrain(text.astype(self.dtype), layers.TEXT_AXES)

    res_cls = blocks.maybe_remat(ResnetBlock, self.remat)
    attn_cls = blocks.maybe_remat(AddedKVAttention, self.remat)
    res_kw = dict(
        groups=c.norm_num_groups,
        eps=c.norm_eps,
        act_fn=c.act_fn,
        scale_shift=c.resnet_time_scale_shift == "scale_shift",
        skip_time_act=c.resnet_skip_time_act,
        **kw,
    )

    def res(name, ch, h, resample="none", scale=c.resnet_out_scale_factor):
      return res_cls(ch, resample, output_scale_factor=scale, name=name, **res_kw)(h, emb)

    def att(name, h, head_dim, only_cross):
      return attn_cls(
          head_dim,
          c.norm_num_groups,
          only_cross,
          self.attn_impl,
          c.cross_attention_norm == "group_norm",
          name=name,
          **kw,
      )(h, text, text_mask)

    h = layers.conv(c0, c.conv_in_kernel, name="conv_in", **kw)(x.astype(self.dtype))
    skips = [h]
    n = len(c.block_out_channels)
    for i, kind in enumerate(c.down_block_types):
      ch, p = c.block_out_channels[i], f"down_blocks_{i}"
      for j in range(c.layers_per_block[i]):
        h = res(f"{p}_resnets_{j}", ch, h)
        if kind == "SimpleCrossAttnDownBlock2D":
          h = att(f"{p}_attentions_{j}", h, c.attention_head_dim[i], c.only_cross_attention[i])
        skips.append(h)
      if i != n - 1:
        h = res(f"{p}_downsamplers_0", ch, h, "down")
        skips.append(h)

    mid_ch = c.block_out_channels[-1]
    h = res("mid_block_resnets_0", mid_ch, h, scale=c.mid_block_scale_factor)
    h = att("mid_block_attentions_0", h, c.attention_head_dim[-1], c.mid_block_only_cross_attention)
    h = res("mid_block_resnets_1", mid_ch, h, scale=c.mid_block_scale_factor)

    rev_ch = c.block_out_channels[::-1]
    rev_layers = c.layers_per_block[::-1]
    rev_only = c.only_cross_attention[::-1]
    for i, kind in enumerate(c.up_block_types):
      ch, p = rev_ch[i], f"up_blocks_{i}"
      for j in range(rev_layers[i] + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = res(f"{p}_resnets_{j}", ch, h)
        if kind == "SimpleCrossAttnUpBlock2D":
          # diffusers indexes the up blocks' head dims unreversed (attention_head_dim[i]).
          h = att(f"{p}_attentions_{j}", h, c.attention_head_dim[i], rev_only[i])
      if i != n - 1:
        h = res(f"{p}_upsamplers_0", ch, h, "up")
    if skips:
      raise ValueError(f"U-Net skip bookkeeping is off: {len(skips)} skips left")

    h = activation(c.act_fn)(
        group_norm(h, c.norm_num_groups, c.norm_eps, self.param_dtype, "conv_norm_out")
    )
    out = layers.conv(c.out_channels, c.conv_out_kernel, name="conv_out", **kw)(
        h.astype(self.dtype)
    )
    return out.astype(jnp.float32)


class IFDenoiser(nn.Module):
  """An IF U-Net behind our network contract (docs/interfaces.md, `unet.build_model`):

  __call__(x_t [B,H,W,3], logsnr [B], text_emb [B,L,D], text_mask [B,L], lowres=None,
           aug_level=None, train=False) -> eps [B,H,W,3] (or [B,H,W,6] with the learned-range
           v when `full_output`)

  IF's timestep is the fractional step of its table at this logsnr,
  u = (N - 1) t(logsnr) (`schedules.squaredcos_t`: IF's own step i at its grid points); IF-II
  reads [x_t; lowres] (6 channels) and noise_level = round(N aug_level)
  (`discrete.noise_level_of`). `use_text_mask=False` attends to all L text tokens as IF's
  pipeline does (it passes no mask); True drops the padding. Params: `{"unet": IFUNet's}`.
  """

  config: IFConfig
  use_text_mask: bool = False
  full_output: bool = False
  attn_impl: str = "auto"
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x_t, logsnr, text_emb, text_mask, lowres=None, aug_level=None, train: bool = False
  ):
    del train  # IF's networks have no dropout at inference
    c = self.config
    x = x_t
    noise_level = None
    if c.is_sr:
      if lowres is None or aug_level is None:
        raise ValueError("an IF-II network needs lowres [B, H, W, 3] and aug_level [B]")
      x = jnp.concatenate([x_t, lowres.astype(x_t.dtype)], axis=-1)
      noise_level = discrete.noise_level_of(aug_level).astype(jnp.float32)
    elif lowres is not None:
      raise ValueError("lowres given to an IF-I (text->image) network")
    t = schedules.squaredcos_t(logsnr) * (schedules.SQUAREDCOS_STEPS - 1)
    out = IFUNet(c, self.attn_impl, self.remat, self.dtype, self.param_dtype, name="unet")(
        x, t, text_emb, text_mask if self.use_text_mask else None, noise_level
    )
    return out if self.full_output else out[..., : x_t.shape[-1]]


def build_denoiser(model_config, config: IFConfig | None = None) -> IFDenoiser:
  """`IFDenoiser` from a stage's `model` block (kind "deepfloyd"): the U-Net's `config.json`
  is read from `model_config.path` (a diffusers `unet/` folder; a `gs://` folder is copied
  locally first) unless `config` is given."""
  c = model_config
  if config is None:
    path = str(c.path)
    config = read_config(paths.local_copy(path) if paths.is_remote(path) else path)
  return IFDenoiser(
      config,
      use_text_mask=bool(c.get("use_text_mask", False)),
      full_output=bool(c.get("full_output", False)),
      attn_impl=str(c.get("attn_impl", "auto")),
      remat=bool(c.get("remat", False)),
      dtype=dtypes.get_dtype(c.get("dtype", None), "model.dtype"),
      param_dtype=dtypes.get_dtype(c.get("param_dtype", None), "model.param_dtype"),
  )
