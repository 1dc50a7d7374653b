"""DeepFloyd IF U-Net settings, read from a diffusers `UNet2DConditionModel` `config.json`.

IF's pixel stages (IF-I 64x64 text->image, IF-II 64->256 super-resolution) are published as
diffusers `UNet2DConditionModel`s with a fixed family of options: `ResnetDownsampleBlock2D` /
`SimpleCrossAttnDownBlock2D` down blocks (BigGAN-style resampling ResBlocks, attention whose
keys/values are the image tokens plus the projected text tokens), the
`UNetMidBlock2DSimpleCrossAttn` middle, the mirrored up blocks, a text projection
`encoder_hid_dim -> cross_attention_dim` (T5-XXL's 4096), attention-pooled text added to the
time embedding (`addition_embed_type="text"`), IF-II's noise level embedded like a timestep
(`class_embed_type="timestep"`), scale-shift ResBlocks and learned-range variance channels
(`out_channels = 2 * in_channels(image)`).

`IFConfig.from_dict` reads exactly those fields and refuses every value outside that family
with the field, the value and what is allowed, so a config our network would compute
differently from diffusers' never loads silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

DOWN_BLOCKS = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
UP_BLOCKS = ("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DSimpleCrossAttn",)
ACTIVATIONS = ("gelu", "silu", "swish")
# IF's attention normalises the text tokens before their keys and values (its `norm_encoder`,
# diffusers' `cross_attention_norm="group_norm"`: GroupNorm(32, cross_attention_dim)).
CROSS_ATTENTION_NORMS = (None, "group_norm")
CROSS_NORM_GROUPS = 32  # diffusers' Attention `cross_attention_norm_num_groups` default

# Fields whose value must be the default: our network implements only that behaviour.
_FIXED = {
    "time_embedding_type": ("positional",),
    "center_input_sample": (False,),
    "class_embeddings_concat": (False,),
    "dual_cross_attention": (False,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "num_class_embeds": (None,),
    "num_attention_heads": (None,),
    "attention_type": ("default",),
    "transformer_layers_per_block": (1,),
    "addition_time_embed_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
}


class IFConfigError(ValueError):
  """A config.json field has a value this implementation does not compute."""


def _per_block(value, n: int, field: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise IFConfigError(f"{field} has {len(value)} entries; give one per down block ({n})")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class IFConfig:
  """The fields of an IF U-Net (names as in diffusers' config.json; per-block tuples)."""

  in_channels: int
  out_channels: int
  block_out_channels: tuple[int, ...]
  layers_per_block: tuple[int, ...]
  down_block_types: tuple[str, ...]
  up_block_types: tuple[str, ...]
  attention_head_dim: tuple[int, ...]
  cross_attention_dim: int
  encoder_hid_dim: int | None
  addition_embed_type: str | None
  addition_embed_type_num_heads: int
  class_embed_type: str | None
  act_fn: str
  time_embedding_act_fn: str | None
  time_embedding_dim: int | None
  resnet_time_scale_shift: str
  resnet_skip_time_act: bool
  resnet_out_scale_factor: float
  mid_block_scale_factor: float
  norm_num_groups: int
  norm_eps: float
  flip_sin_to_cos: bool
  freq_shift: float
  only_cross_attention: tuple[bool, ...]
  mid_block_only_cross_attention: bool
  cross_attention_norm: str | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  sample_size: int = 64

  @property
  def time_embed_dim(self) -> int:
    """Width E of the conditioning vector (diffusers: `time_embedding_dim or 4 * C0`)."""
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def text_dim(self) -> int:
    """Width D of the text embeddings the network reads (T5-XXL: 4096)."""
    return self.encoder_hid_dim or self.cross_attention_dim

  @property
  def is_sr(self) -> bool:
    """An SR stage: conditioned on a noise level (IF-II) and reading a low-res image."""
    return self.class_embed_type == "timestep"

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "IFConfig":
    d = dict(d)
    cls_name = d.get("_class_name", "UNet2DConditionModel")
    if cls_name != "UNet2DConditionModel":
      raise IFConfigError(f"_class_name={cls_name!r}; allowed: 'UNet2DConditionModel'")
    for field, allowed in _FIXED.items():
      if field in d and d[field] not in allowed:
        if not (field == "transformer_layers_per_block" and isinstance(d[field], list)):
          raise IFConfigError(f"{field}={d[field]!r}; allowed: {allowed}")
    down = tuple(d["down_block_types"])
    up = tuple(d["up_block_types"])
    n = len(down)
    ch = tuple(int(c) for c in d["block_out_channels"])
    if len(ch) != n or len(up) != n:
      raise IFConfigError(
          f"block_out_channels ({len(ch)}), down_block_types ({n}) and up_block_types "
          f"({len(up)}) must have one entry per level"
      )
    for field, names, allowed in (
        ("down_block_types", down, DOWN_BLOCKS),
        ("up_block_types", up, UP_BLOCKS),
    ):
      bad = [b for b in names if b not in allowed]
      if bad:
        raise IFConfigError(f"{field} has {bad}; allowed: {allowed}")
    mid = d.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in MID_BLOCKS:
      raise IFConfigError(f"mid_block_type={mid!r}; allowed: {MID_BLOCKS}")
    hid_type = d.get("encoder_hid_dim_type")
    if hid_type not in (None, "text_proj"):
      raise IFConfigError(f"encoder_hid_dim_type={hid_type!r}; allowed: None, 'text_proj'")
    if hid_type == "text_proj" and d.get("encoder_hid_dim") is None:
      raise IFConfigError("encoder_hid_dim_type='text_proj' needs encoder_hid_dim")
    add = d.get("addition_embed_type")
    if add not in (None, "text"):
      raise IFConfigError(f"addition_embed_type={add!r}; allowed: None, 'text'")
    cemb = d.get("class_embed_type")
    if cemb not in (None, "timestep"):
      raise IFConfigError(f"class_embed_type={cemb!r}; allowed: None, 'timestep'")
    act = d.get("act_fn", "silu")
    tact = d.get("time_embedding_act_fn")
    for field, v in (("act_fn", act), ("time_embedding_act_fn", tact)):
      if v is not None and v not in ACTIVATIONS:
        raise IFConfigError(f"{field}={v!r}; allowed: {ACTIVATIONS}")
    shift = d.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
      raise IFConfigError(f"resnet_time_scale_shift={shift!r}; allowed: 'default', 'scale_shift'")
    heads = _per_block(d.get("attention_head_dim", 8), n, "attention_head_dim")
    if any(h is None for h in heads):
      raise IFConfigError(f"attention_head_dim={heads!r}: every entry must be an int")
    xdim = d.get("cross_attention_dim", 1280)
    if isinstance(xdim, (list, tuple)):
      if len(set(xdim)) != 1:
        raise IFConfigError(f"cross_attention_dim={xdim!r}: per-block widths are not supported")
      xdim = xdim[0]
    oca = d.get("only_cross_attention", False)
    mid_oca = d.get("mid_block_only_cross_attention")
    if isinstance(oca, bool):
      mid_oca = oca if mid_oca is None else mid_oca
    mid_oca = bool(mid_oca) if mid_oca is not None else False
    xnorm = d.get("cross_attention_norm")
    if xnorm not in CROSS_ATTENTION_NORMS:
      raise IFConfigError(f"cross_attention_norm={xnorm!r}; allowed: {CROSS_ATTENTION_NORMS}")
    if xnorm == "group_norm" and int(xdim) % CROSS_NORM_GROUPS:
      raise IFConfigError(
          f"cross_attention_dim={xdim} is not a multiple of the {CROSS_NORM_GROUPS} groups of "
          "cross_attention_norm='group_norm'"
      )
    groups = int(d.get("norm_num_groups", 32))
    bad = [c for c in ch if c % groups]
    if bad:
      raise IFConfigError(f"block_out_channels {bad} are not multiples of norm_num_groups={groups}")
    # Attention widths: down block i reads head dim i, up block i (width ch[-1 - i]) head dim i
    # too (diffusers indexes it unreversed), the middle the last one.
    attn = [(ch[i], heads[i]) for i, b in enumerate(down) if b == DOWN_BLOCKS[1]]
    attn += [(ch[n - 1 - i], heads[i]) for i, b in enumerate(up) if b == UP_BLOCKS[1]]
    for width, h in attn + [(ch[-1], heads[-1])]:
      if width % int(h):
        raise IFConfigError(f"attention_head_dim={h} must divide the attention width {width}")
    return cls(
        in_channels=int(d.get("in_channels", 4)),
        out_channels=int(d.get("out_channels", 4)),
        block_out_channels=ch,
        layers_per_block=tuple(int(x) for x in _per_block(d.get("layers_per_block", 2), n, "l")),
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=tuple(int(h) for h in heads),
        cross_attention_dim=int(xdim),
        encoder_hid_dim=None if d.get("encoder_hid_dim") is None else int(d["encoder_hid_dim"]),
        addition_embed_type=add,
        addition_embed_type_num_heads=int(d.get("addition_embed_type_num_heads", 64)),
        class_embed_type=cemb,
        act_fn=act,
        time_embedding_act_fn=tact,
        time_embedding_dim=d.get("time_embedding_dim"),
        resnet_time_scale_shift=shift,
        resnet_skip_time_act=bool(d.get("resnet_skip_time_act", False)),
        resnet_out_scale_factor=float(d.get("resnet_out_scale_factor", 1.0)),
        mid_block_scale_factor=float(d.get("mid_block_scale_factor", 1.0)),
        norm_num_groups=groups,
        norm_eps=float(d.get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
        freq_shift=float(d.get("freq_shift", 0)),
        only_cross_attention=tuple(bool(x) for x in _per_block(oca, n, "only_cross_attention")),
        mid_block_only_cross_attention=mid_oca,
        cross_attention_norm=xnorm,
        conv_in_kernel=int(d.get("conv_in_kernel", 3)),
        conv_out_kernel=int(d.get("conv_out_kernel", 3)),
        sample_size=int(d.get("sample_size") or 64),
    )


def read_config(path: str) -> IFConfig:
  """`IFConfig` of a local diffusers U-Net folder (`<path>/config.json`)."""
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise IFConfigError(f"no config.json in {path!r} (a diffusers U-Net folder has one)")
  with open(file) as f:
    return IFConfig.from_dict(json.load(f))
