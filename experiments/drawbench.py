"""DrawBench side-by-side rating sheet for two models or two sets of sampling settings.

Imagen §4.3 / App. A: k images per prompt from model A and model B, shown side by side with
left/right randomised (seeded, recorded), rated on alignment and on fidelity.

  python experiments/drawbench.py --prompts=/path/to/drawbench_prompts.tsv \
      --workdirs_a=demo_out/base,demo_out/sr --workdirs_b=demo_out/base,demo_out/sr \
      --config_b.stage1.guidance_weight=1 --name_a=w3 --name_b=w1 --k=2 --outdir=drawbench

The prompt list is not shipped: export the DrawBench Google Sheet linked from
https://imagen.research.google as `category<TAB>prompt` lines (see imagen_jax/evals/drawbench.py).
Writes <outdir>/rating_sheet.html (self-contained; open it, rate, "export CSV"), its
left/right assignment rating_sheet.html.sides.json, and grids/<category>.png.
"""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from imagen_jax import cli, paths
from imagen_jax.evals import drawbench
from imagen_jax.sampling import cascade, hosts

_DEFAULT_CFG = "configs/cascade.py:shapes"
_CONFIG_A = config_flags.DEFINE_config_file("config_a", _DEFAULT_CFG, "model A's settings")
_CONFIG_B = config_flags.DEFINE_config_file("config_b", _DEFAULT_CFG, "model B's settings")
_PROMPTS = flags.DEFINE_string("prompts", None, "category<TAB>prompt file", required=True)
_WORKDIRS_A = flags.DEFINE_list(
    "workdirs_a", None, "model A's stage workdirs (default: " "config_a's)"
)
_WORKDIRS_B = flags.DEFINE_list("workdirs_b", None, "model B's (default: model A's)")
_NAME_A = flags.DEFINE_string("name_a", "A", "model A's name in the exported CSV")
_NAME_B = flags.DEFINE_string("name_b", "B", "model B's name")
_K = flags.DEFINE_integer("k", 4, "images per prompt and model")
_LIMIT = flags.DEFINE_integer("limit", None, "only the first N prompts (smoke runs)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed (both models: paired noise)")
_SIDES_SEED = flags.DEFINE_integer("sides_seed", 1234, "left/right randomisation seed")
_BATCH = flags.DEFINE_integer(
    "batch_size", None, "sampling batch size; default: the cascade config's batch_size"
)
_OUTDIR = flags.DEFINE_string("outdir", "drawbench", "output folder")
_NEGATIVE = cli.define_negative_prompt()  # both models, as imagen_jax.sampling's


def _model(cfg, workdirs, cache):
  workdirs = workdirs or [cfg[f"stage{k + 1}"].workdir for k in range(int(cfg.num_stages))]
  key = tuple(os.path.abspath(w) for w in workdirs)
  if key not in cache:  # two settings of one cascade load it once
    cache[key] = cascade.Cascade.from_workdirs(workdirs, deepfloyd=cfg.get("deepfloyd", None))
  settings = cascade.stage_settings(cfg, len(workdirs))
  return cache[key], settings, workdirs


def main(argv):
  del argv
  items = drawbench.read_prompts(cli.require_file("prompts", _PROMPTS.value, "prompt file"))[
      : _LIMIT.value
  ]
  cache = {}
  model_a, settings_a, wd_a = _model(_CONFIG_A.value, _WORKDIRS_A.value, cache)
  model_b, settings_b, _ = _model(_CONFIG_B.value, _WORKDIRS_B.value or wd_a, cache)
  prompts = [p for _, p in items]
  try:  # config_a's batch_size unless --batch_size; refused unless it divides
    batch = hosts.application_batch_size(model_a, _BATCH.value, _CONFIG_A.value)
    if model_b is not model_a:  # another cascade: config_b's stage batches, the same batch
      hosts.application_batch_size(model_b, batch, _CONFIG_B.value)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  neg = _NEGATIVE.value
  images_a = drawbench.sample_k(
      model_a,
      prompts,
      settings_a,
      _K.value,
      seed=_SEED.value,
      batch_size=batch,
      negative_prompt=neg,
  )
  images_b = drawbench.sample_k(
      model_b,
      prompts,
      settings_b,
      _K.value,
      seed=_SEED.value,
      batch_size=batch,
      negative_prompt=neg,
  )
  paths.makedirs(_OUTDIR.value)
  sheet = os.path.join(_OUTDIR.value, "rating_sheet.html")
  drawbench.write_rating_sheet(
      sheet, items, images_a, images_b, _NAME_A.value, _NAME_B.value, _SIDES_SEED.value, neg
  )
  grids = drawbench.write_category_grids(
      os.path.join(_OUTDIR.value, "grids"), items, images_a, images_b, _NAME_A.value, _NAME_B.value
  )
  print(
      f"wrote {sheet} ({len(items)} prompts x {_K.value} images per model) and "
      f"{len(grids)} category grids in {_OUTDIR.value}/grids"
  )


if __name__ == "__main__":
  cli.run(main)
