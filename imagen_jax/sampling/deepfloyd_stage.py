"""DeepFloyd IF stages in our cascade: a diffusers `unet/` folder as a cascade stage.

A cascade stage's `workdir` may be a published IF U-Net folder instead of one of our training
workdirs (`is_diffusers_unet`): `config.json` with `_class_name: UNet2DConditionModel` and the
safetensors weights (`nn.deepfloyd_checkpoint`). `load_stage` then builds the stage config
(`stage_config`: model kind "deepfloyd", IF's squaredcos_cap_v2 table, eps target, IF's T5-XXL
at max_length 77) from the U-Net's config and the cascade's `deepfloyd` block (the text encoder
folder, dtypes, mesh rules), and reads the weights straight into their shards. Stage I is
text -> 64x64; stage II (`class_embed_type="timestep"`) is 64 -> `sample_size` (256).
"""

from __future__ import annotations

import json
import os

import ml_collections

from imagen_jax import paths
from imagen_jax.nn import deepfloyd, deepfloyd_checkpoint
from imagen_jax.nn.deepfloyd_config import IFConfig
from imagen_jax.parallel import sharding as sharding_lib
from imagen_jax.sampling import stage_sampler as ss
from imagen_jax.stage import Stage

TEXT_ENCODER = "t5-v1_1-xxl"
TEXT_MAX_LENGTH = 77  # IF's pipeline pads / truncates prompts to 77 tokens


def is_diffusers_unet(folder: str) -> bool:
  """True when `folder/config.json` describes a diffusers `UNet2DConditionModel`."""
  path = paths.join(folder, "config.json")
  if not paths.path(path).exists():
    return False
  try:
    cfg = json.loads(paths.path(path).read_text())
  except ValueError:
    return False
  return isinstance(cfg, dict) and cfg.get("_class_name") == "UNet2DConditionModel"


def stage_config(
    unet_dir: str, unet_config: IFConfig, deepfloyd_block, *, lowres_size: int = 64
) -> ml_collections.ConfigDict:
  """Our stage config for an IF U-Net folder (see module doc). `deepfloyd_block` fields:
  text_path (T5-XXL HF folder with its tokenizer files), text_max_length, dtype, param_dtype,
  attn_impl, use_text_mask, logical_axis_rules, fsdp_min_size; lowres_size (IF-II's input
  side, 64) and text_name (IF: t5-v1_1-xxl) for tests on reduced models."""
  b = deepfloyd_block
  text_name = str((b or {}).get("text_name", TEXT_ENCODER))
  if b is None or (not b.get("text_path") and text_name == TEXT_ENCODER):
    raise ValueError(
        f"{unet_dir} is a DeepFloyd IF U-Net: the cascade config needs deepfloyd.text_path, "
        "the T5-v1.1-XXL folder (IF's text_encoder/ with the tokenizer files beside it)"
    )
  c = ml_collections.ConfigDict()
  c.stage = "if_ii" if unet_config.is_sr else "if_i"
  c.image_size = unet_config.sample_size
  c.lowres_size = int(b.get("lowres_size", lowres_size)) if unet_config.is_sr else 0
  c.data = ml_collections.ConfigDict({"sr_crop_size": 0})
  c.model = ml_collections.ConfigDict(
      dict(
          kind="deepfloyd",
          path=unet_dir,
          dtype=str(b.get("dtype", "bfloat16")),
          param_dtype=str(b.get("param_dtype", "float32")),
          attn_impl=str(b.get("attn_impl", "auto")),
          use_text_mask=bool(b.get("use_text_mask", False)),
          remat=False,
      )
  )
  c.diffusion = ml_collections.ConfigDict(
      dict(schedule="squaredcos_cap_v2", num_timesteps=1000, target="eps")
  )
  c.text = ml_collections.ConfigDict(
      dict(
          name=text_name,
          path=b.get("text_path", None),
          max_length=int(b.get("text_max_length", TEXT_MAX_LENGTH)),
          dtype=str(b.get("text_dtype", "bfloat16")),
          # IF's U-Nets read T5's outputs at the padding too (its pipeline passes no mask).
          zero_padding=bool(b.get("use_text_mask", False)),
      )
  )
  rules = b.get("logical_axis_rules", None)
  c.mesh = ml_collections.ConfigDict(
      dict(
          logical_axis_rules=None if rules is None else [list(r) for r in rules],
          fsdp_min_size=int(b.get("fsdp_min_size", 0) or 0),
      )
  )
  return c


def build_stage(
    unet_dir: str, deepfloyd_block, *, local: str | None = None
) -> tuple[ml_collections.ConfigDict, Stage]:
  """`(stage config, stage)` of an IF U-Net folder from its `config.json` alone (no weights
  are read; what `aot/compile_cascade.py` compiles). `local`: a local copy of a `gs://`
  folder."""
  local = local or unet_dir
  if not os.path.isdir(local):
    raise FileNotFoundError(f"no IF U-Net folder at {unet_dir!r}")
  model = deepfloyd.build_denoiser(
      ml_collections.ConfigDict(dict(kind="deepfloyd", path=local)), None
  )
  config = stage_config(unet_dir, model.config, deepfloyd_block)
  return config, Stage.from_config(
      config, model=deepfloyd.build_denoiser(config.model, model.config)
  )


def load_stage(
    unet_dir: str, deepfloyd_block, *, mesh=None, rules=None, fsdp_min_size: int | None = None
) -> tuple[ml_collections.ConfigDict, Stage, dict]:
  """`(stage config, stage, params)` of an IF U-Net folder: its weights read into their shards
  on `mesh` (default `stage_sampler.default_mesh()`), laid out by `rules` (default the
  block's)."""
  local = paths.local_copy(unet_dir) if paths.is_remote(unet_dir) else unet_dir
  config, stage = build_stage(unet_dir, deepfloyd_block, local=local)
  mesh = ss.default_mesh() if mesh is None else mesh
  rules = sharding_lib.rules_from_config(config) if rules is None else rules
  fsdp = sharding_lib.fsdp_min_size_from_config(config) if fsdp_min_size is None else fsdp_min_size
  shardings = ss.stage_param_shardings(stage, mesh, rules, fsdp)
  unet = deepfloyd.IFUNet(stage.model.config)
  params = deepfloyd_checkpoint.load_params(
      local,
      unet,
      shardings=shardings["unet"],
      param_dtype=stage.model.param_dtype,
  )
  return config, stage, {"unet": params}


def image_size(unet_dir: str) -> int:
  """The side of the images an IF U-Net folder's stage makes (its `sample_size`)."""
  cfg = json.loads(paths.path(paths.join(unet_dir, "config.json")).read_text())
  return int(cfg.get("sample_size") or 64)
