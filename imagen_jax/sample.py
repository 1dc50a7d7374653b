"""Sample a trained cascade: `python -m imagen_jax.sample --config=configs/cascade.py:shapes
--prompt="a red circle in the center" [--prompt=...] [--prompt_file=F] --outdir=DIR`.

Writes, per stage k: `stage{k}_grid.png` (all samples, one row per prompt) and
`stage{k}/NNNN.png` (single images), plus `samples.png` (prompt | stage 1 | stage 2 | ...) and
`settings.json` (every setting, the stage checkpoints' steps, the prompts, the mesh). Samples
on a mesh of this process's devices (`--mesh_shape=data=2,fsdp=-1,tensor=1`; default: all on
fsdp, `sharded_sampling.DEFAULT_MESH_SHAPE`). Multi-host: the same command on every host with
`--distributed` splits the prompts over all processes (`parallel.hosts`; sample i is the same
whichever host draws it) and process 0 writes. Thin entry point: the logic is
`imagen_jax.cascade`.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from imagen_jax.parallel import hosts

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/cascade.py:shapes", "cascade config (configs/cascade.py:VARIANT)"
)
_PROMPTS = flags.DEFINE_multi_string("prompt", [], "a prompt (repeat the flag for several)")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "a text file, one prompt per line")
_OUTDIR = flags.DEFINE_string("outdir", "samples_out", "where the PNGs and settings go")
_PER_PROMPT = flags.DEFINE_integer("num_per_prompt", 4, "samples per prompt")
_MESH_SHAPE = flags.DEFINE_string(
    "mesh_shape", "", "sampling mesh, e.g. data=2,fsdp=-1,tensor=1 (-1 fills); '' = all on fsdp"
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
  from imagen_jax.evals import prompts as prompts_lib

  out = list(prompts) + (prompts_lib.read_texts(prompt_file) if prompt_file else [])
  if not out:
    raise app.UsageError("give at least one --prompt or a --prompt_file")
  return out


def main(argv):
  del argv
  hosts.initialize_from_flags()  # before anything touches the jax backend
  from imagen_jax import atomic, cascade, images

  c = _CONFIG.value
  prompts = read_prompts(_PROMPTS.value, _PROMPT_FILE.value)
  if c.num_stages not in (1, 2, 3):
    raise app.UsageError(f"num_stages={c.num_stages}; allowed: 1, 2, 3")
  blocks = [c.stage1, c.stage2, c.stage3][: c.num_stages]
  model = cascade.Cascade.from_workdirs(
      [b.workdir for b in blocks], mesh_shape=parse_mesh_shape(_MESH_SHAPE.value)
  )
  settings = [cascade.SamplingSettings.from_config(b) for b in blocks]
  k = _PER_PROMPT.value
  expanded = [p for p in prompts for _ in range(k)]
  batch = min(int(c.batch_size), len(expanded))  # a few prompts: no padding to a whole batch
  outs = hosts.sample(model, expanded, settings, seed=int(c.seed), batch_size=batch)
  if not hosts.is_writer():
    return
  os.makedirs(_OUTDIR.value, exist_ok=True)
  for s, out in enumerate(outs, start=1):
    u8 = images.to_uint8(out)
    images.save_grid(u8, os.path.join(_OUTDIR.value, f"stage{s}_grid.png"), ncols=k)
    single = os.path.join(_OUTDIR.value, f"stage{s}")
    os.makedirs(single, exist_ok=True)
    for i, img in enumerate(u8):
      atomic.save_png(os.path.join(single, f"{i:04d}.png"), img)
  rows = [[images.to_uint8(o[i]) for o in outs] for i in range(0, len(expanded), k)]
  sheet = images.labelled_grid(rows, prompts, [f"stage {s}" for s in range(1, len(outs) + 1)])
  atomic.save_png(os.path.join(_OUTDIR.value, "samples.png"), sheet)
  atomic.write_json(
      os.path.join(_OUTDIR.value, "settings.json"),
      {
          "config": c.to_dict(),
          "prompts": prompts,
          "num_per_prompt": k,
          "stage_steps": [s.step for s in model.stages],
          "mesh": dict(model.mesh.shape),
      },
  )
  print(f"wrote {len(expanded)} samples per stage to {_OUTDIR.value}")


if __name__ == "__main__":
  app.run(main)
