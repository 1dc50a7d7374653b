"""Sample a trained cascade: `python -m imagen_jax.sampling --config=configs/cascade.py:shapes
--prompt="a red circle in the center" [--prompt=...] [--prompt_file=F] --outdir=DIR`.

Writes, per stage k: `stage{k}_grid.png` (all samples, one row per prompt) and
`stage{k}/NNNN.png` (single images), plus `samples.png` (prompt | stage 1 | stage 2 | ...) and
`settings.json` (every setting, the stage checkpoints' steps, the prompts, the mesh). The
sampler flags below (`--sampler=heun --time_grid=karras --guidance_rescale=0.7 ...`) override
the config's value at every stage; per stage, set `--config.stageK.FIELD`. Samples
on a mesh of this process's devices (`--mesh_shape=data=2,fsdp=-1,tensor=1`; default: all on
fsdp, `stage_sampler.DEFAULT_MESH_SHAPE`). Multi-host: the same command on every host with
`--distributed` splits the prompts over all processes (`parallel.hosts`; sample i is the same
whichever host draws it) and process 0 writes. Thin entry point: the logic is
`imagen_jax.sampling.cascade`.

Editing (`diffusion.editing`), at every stage: `--init_image=IMG.png` (S x S, the last stage's
size) with `--strength=0.6` is image-to-image (SDEdit); with `--mask=MASK.png` (S x S, white =
known, kept; black = regenerated: imagen-pytorch's `inpaint_masks`) it inpaints (RePaint,
`--resample_steps` times per step).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import PIL.Image
from absl import app, flags
from ml_collections import config_flags

from imagen_jax import atomic, cli, images, paths, profiling, stage
from imagen_jax.diffusion import editing
from imagen_jax.evals import prompts as prompts_lib
from imagen_jax.sampling import cascade, hosts

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/cascade.py:shapes", "cascade config (configs/cascade.py:VARIANT)"
)
_PROMPTS = flags.DEFINE_multi_string("prompt", [], "a prompt (repeat the flag for several)")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "a text file, one prompt per line")
_NEGATIVE = cli.define_negative_prompt()
_OUTDIR = flags.DEFINE_string("outdir", "samples_out", "where the PNGs and settings go")
_PER_PROMPT = flags.DEFINE_integer("num_per_prompt", 4, "samples per prompt")
_INIT_IMAGE = flags.DEFINE_string(
    "init_image", None, "PNG to edit (S x S, the last stage's size): img2img / inpainting"
)
_MASK = flags.DEFINE_string(
    "mask", None, "inpainting mask PNG (S x S): white = known (kept), black = regenerated"
)
_STRENGTH = flags.DEFINE_float(
    "strength", 1.0, "img2img strength in (0, 1]: start at t = strength * t_max (SDEdit)"
)
_RESAMPLE = flags.DEFINE_integer(
    "resample_steps", 5, "inpainting: RePaint's r, runs of each step (imagen-pytorch's default 5)"
)
_MESH_SHAPE = flags.DEFINE_string(
    "mesh_shape", "", "sampling mesh, e.g. data=2,fsdp=-1,tensor=1 (-1 fills); '' = all on fsdp"
)
# Sampler and guidance overrides for every stage (None: the config's stageK value).
_SAMPLER = flags.DEFINE_string(
    "sampler", None, "ddpm | ddim | dpmpp_2m | heun | euler_ancestral (heun: 2N-1 network calls)"
)
_TIME_GRID = flags.DEFINE_string("time_grid", None, "uniform_t | logsnr_uniform | karras (EDM)")
_GUIDANCE_SCHEDULE = flags.DEFINE_string(
    "guidance_schedule", None, "w(t) per step: constant | linear (rising from 1 at t=1)"
)
_GUIDANCE_RESCALE = flags.DEFINE_float(
    "guidance_rescale", None, "CFG rescale phi in [0, 1] (Lin et al. 2023; 0 = off, 0.7 theirs)"
)
_MAX_SCALE = flags.DEFINE_float(
    "max_scale", None, "cap c >= 1 on the dynamic-thresholding s (DeepFloyd IF: 1.5)"
)


def stage_overrides() -> dict:
  """The sampler / guidance flags that were given, as `SamplingSettings` fields."""
  given = {
      "sampler": _SAMPLER.value,
      "time_grid": _TIME_GRID.value,
      "guidance_schedule": _GUIDANCE_SCHEDULE.value,
      "guidance_rescale": _GUIDANCE_RESCALE.value,
      "max_scale": _MAX_SCALE.value,
  }
  return {k: v for k, v in given.items() if v is not None}


def apply_overrides(settings, overrides: dict) -> list:
  """Every stage's `SamplingSettings` with `overrides` set (validated there: a bad name or
  range, e.g. --guidance_rescale=1.5, is a UsageError naming the value and what is allowed)."""
  try:
    return stage.override_settings(settings, overrides)
  except (TypeError, ValueError) as e:
    raise app.UsageError(str(e)) from e


_PROFILE = flags.DEFINE_bool(
    "profile", False, "write a jax.profiler trace of the sampling to <outdir>/profile (TensorBoard)"
)

hosts.define_flags()


def parse_mesh_shape(text: str) -> dict[str, int] | None:
  """`"data=2,fsdp=-1"` -> `{"data": 2, "fsdp": -1}`; '' -> None (the default mesh)."""
  if not text.strip():
    return None
  out = {}
  for part in text.split(","):
    name, sep, size = part.partition("=")
    try:
      out[name.strip()] = int(size)
    except ValueError:
      sep = ""
    if not sep:
      raise app.UsageError(
          f"--mesh_shape={text!r}: {part!r} is not AXIS=SIZE (axes data, fsdp, tensor; -1 fills)"
      )
  return out


def read_prompts(prompts, prompt_file) -> list[str]:
  """The --prompt values, then the --prompt_file's (`evals.prompts` format)."""
  if prompt_file:
    cli.require_file("prompt_file", prompt_file, "prompt file")
  out = list(prompts) + (prompts_lib.read_texts(prompt_file) if prompt_file else [])
  if not out:
    raise app.UsageError("give at least one --prompt or a --prompt_file")
  return out


def read_png(path: str, size: int, flag: str, mode: str):
  """A PNG as a uint8 array (PIL `mode`: "RGB" or "L"), or a usage error naming the size."""
  if not paths.path(path).exists():
    raise app.UsageError(f"--{flag}={path!r} does not exist")
  with paths.path(path).open("rb") as f, PIL.Image.open(f) as im:
    if im.size != (size, size):
      raise app.UsageError(
          f"--{flag}={path!r} is {im.size[0]}x{im.size[1]}; allowed: {size}x{size} (the last "
          "stage's images)"
      )
    return np.asarray(im.convert(mode))


def read_edit(size: int):
  """`(init_image [S, S, 3] in [-1, 1] | None, mask [S, S] in [0, 1] | None, EditSettings |
  None)` from the editing flags."""
  if _INIT_IMAGE.value is None:
    if _MASK.value is not None or flags.FLAGS["strength"].present:
      raise app.UsageError("--mask and --strength edit an image: give --init_image")
    return None, None, None
  init = images.from_uint8(read_png(_INIT_IMAGE.value, size, "init_image", "RGB"))
  mask = None
  if _MASK.value is not None:
    mask = read_png(_MASK.value, size, "mask", "L").astype(np.float32) / 255.0
  elif flags.FLAGS["resample_steps"].present:
    raise app.UsageError("--resample_steps is for inpainting: give --mask")
  resample = _RESAMPLE.value if mask is not None else 1
  try:
    edit = editing.EditSettings(strength=_STRENGTH.value, resample_steps=resample)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  return init, mask, edit


def main(argv):
  del argv
  hosts.initialize_from_flags()  # before anything touches the jax backend
  c = _CONFIG.value
  prompts = read_prompts(_PROMPTS.value, _PROMPT_FILE.value)
  if c.num_stages not in (1, 2, 3):
    raise app.UsageError(f"num_stages={c.num_stages}; allowed: 1, 2, 3")
  blocks = [c.stage1, c.stage2, c.stage3][: c.num_stages]
  # Settings and the edit's PNGs (at the last stage's size) first: a bad flag or file fails
  # before the checkpoints load.
  settings = cascade.stage_settings(c)
  settings = apply_overrides(settings, stage_overrides())
  for p in [b.workdir for b in blocks] + [_OUTDIR.value]:  # an unusable bucket: one line
    paths.check_access(p)
  init_image, mask, edit = read_edit(cascade.stage_image_size(blocks[-1].workdir))
  model = cascade.Cascade.from_workdirs(
      [b.workdir for b in blocks],
      mesh_shape=parse_mesh_shape(_MESH_SHAPE.value),
      deepfloyd=c.get("deepfloyd", None),  # IF U-Net folders as stages (configs/cascade.py)
  )
  try:  # the configured batches must divide over the batch shards (a few prompts may pad)
    hosts.application_batch_size(model, None, c)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  k = _PER_PROMPT.value
  expanded = [p for p in prompts for _ in range(k)]
  batch = min(int(c.batch_size), len(expanded))  # a few prompts: no padding to a whole batch
  with profiling.trace(paths.join(_OUTDIR.value, "profile") if _PROFILE.value else None):
    outs = hosts.sample(
        model,
        expanded,
        settings,
        seed=int(c.seed),
        batch_size=batch,
        init_image=init_image,
        mask=mask,
        edit=edit,
        negative_prompts=None if _NEGATIVE.value is None else [_NEGATIVE.value] * len(expanded),
    )
  if not hosts.is_writer():
    return
  for s, out in enumerate(outs, start=1):
    u8 = images.to_uint8(out)
    images.save_grid(u8, paths.join(_OUTDIR.value, f"stage{s}_grid.png"), ncols=k)
    single = paths.join(_OUTDIR.value, f"stage{s}")
    for i, img in enumerate(u8):
      atomic.save_png(paths.join(single, f"{i:04d}.png"), img)
  rows = [[images.to_uint8(o[i]) for o in outs] for i in range(0, len(expanded), k)]
  sheet = images.labelled_grid(rows, prompts, [f"stage {s}" for s in range(1, len(outs) + 1)])
  atomic.save_png(paths.join(_OUTDIR.value, "samples.png"), sheet)
  atomic.write_json(
      paths.join(_OUTDIR.value, "settings.json"),
      {
          "config": c.to_dict(),
          "prompts": prompts,
          "negative_prompt": _NEGATIVE.value,
          "num_per_prompt": k,
          "stage_steps": [s.step for s in model.stages],
          "mesh": dict(model.mesh.shape),
          "stage_settings": [dataclasses.asdict(s) for s in settings],
          "edit": None
          if edit is None
          else {"init_image": _INIT_IMAGE.value, "mask": _MASK.value, **vars(edit)},
      },
  )
  print(f"wrote {len(expanded)} samples per stage to {_OUTDIR.value}")


if __name__ == "__main__":
  cli.run(main)
