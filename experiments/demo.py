"""The built-in demo (`make demo`): a small text-to-image cascade trained on the CPU.

1. Builds the offline shapes dataset (imagen_jax.data.shapes) at 32x32 and 64x64: the same
   scenes, so 32 -> 64 is a real super-resolution task. The frozen text encoder embeds each
   distinct training caption once (a `text.embedding_cache` both stages read).
2. Trains the `shapes` base stage (configs/base64.py:shapes, 32x32 text->image) and the
   `shapes` SR stage (configs/sr256.py:shapes, 32->64, text-conditioned, with noise
   conditioning augmentation) for fixed step budgets, each with the trainer's command line
   (`python -m imagen_jax.train`) in a child process.
3. Samples the held-out test prompts through the cascade at the demo's guidance weight and at
   w = 1 (no guidance), scores every image with the exact shapes alignment metric
   (imagen_jax.evals.shapes_metric), separately on colour+kind combinations never seen in
   training; runs the SR stage alone on real low-res test images for PSNR and edge sharpness
   against bicubic upsampling and the real images.
4. Writes `samples.png` (prompt | stage 1 | stage 2) and `report.json` into --workdir.

Everything resumes: a second `make demo` reuses the dataset and the finished checkpoints.
Run from the repository root: `make demo` (or `python experiments/demo.py --workdir=demo_out`).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
from absl import flags

from configs import base64 as base64_config
from configs import cascade as cascade_config
from configs import sr256 as sr256_config
from imagen_jax import atomic, cli, cli_runner, images
from imagen_jax.data import preprocess, shapes
from imagen_jax.evals import image_metrics, shapes_metric
from imagen_jax.sampling import cascade
from imagen_jax.text import registry

_WORKDIR = flags.DEFINE_string("workdir", "demo_out", "where data, checkpoints and results go")
_BASE_STEPS = flags.DEFINE_integer("base_steps", None, "override the base stage's steps")
_SR_STEPS = flags.DEFINE_integer("sr_steps", None, "override the SR stage's steps")
_NUM_TEST = flags.DEFINE_integer("num_test", 192, "test prompts to sample and score")
_GRID_ROWS = flags.DEFINE_integer("grid_rows", 16, "prompts shown in samples.png")
# The pretrained encoder binds colours to kinds better than the random one at the same budget
# (docs/results/paper_claims.md, claim 1); `make demo` fetches it (`make minilm`), offline after.
_TEXT_NAME = flags.DEFINE_string(
    "text_name",
    "all-minilm-l6-v2",
    "frozen text encoder of both stages (text.registry): all-minilm-l6-v2 (pretrained BERT, "
    "read from .venv/models) or byt5-tiny-random (random T5, nothing to fetch)",
)

# Wall time on a 2-core CPU after the install, which depends on the machine and its load
# (docs/results/demo.md logs the runs): the base stage is about half of it, the SR stage a third.
EXPECTED_MINUTES = "20-30"
VARIANT = "shapes"


def _scores(images, attributes, held_out):
  s = shapes_metric.score_images(list(images), attributes, held_out)
  r = lambda d: {k: round(v, 4) for k, v in d.items()}  # noqa: E731
  return {
      "all": r(s["mean"]),
      "held_out_combinations": r(s["held_out"]),
      "seen_combinations": r(s["seen"]),
      "num": s["num"],
      "num_held_out": s["num_held_out"],
  }


def _stage_arg() -> str:
  """The stage configs' argument: the `shapes` variant with the demo's text encoder."""
  return f"{VARIANT},text_name={_TEXT_NAME.value}"


def train_stage(name: str, config_module, overrides: dict, workdir: str, timings: dict) -> None:
  """Trains (or resumes) one stage with the trainer's command line in a child process."""
  t0 = time.time()
  print(
      f"\n== training the {name} stage: {overrides['train.num_steps']} steps -> {workdir}",
      flush=True,
  )
  try:
    cli_runner.train_stage(f"{config_module.__file__}:{_stage_arg()}", workdir, overrides)
  except cli_runner.TrainingFailed as e:
    # A workdir trained with another stage network is refused by the checkpoint check.
    raise SystemExit(
        f"training the {name} stage failed ({e}). If the error above says the checkpoint in "
        f"{workdir} is of another network, delete {workdir} (or run with another --workdir) "
        "to train the current one."
    ) from e
  timings[f"train_{name}_s"] = round(time.time() - t0, 1)


def evaluate(
    base_dir: str,
    sr_dir: str,
    builder64,
    cascade_cfg,
    out_dir: str,
    *,
    num_test: int,
    grid_rows: int,
) -> dict:
  """Samples the shapes test prompts through the trained cascade and scores them.

  Writes `<out_dir>/samples.png`; returns the report dict (alignment per stage at the demo's
  guidance weight and at w = 1, on all / held-out / seen combinations; the SR stage alone on
  real low-res inputs: PSNR and edge sharpness beside bicubic upsampling and the real images).
  """
  t0 = time.time()
  test = shapes.read_examples(builder64, "test", limit=num_test)
  prompts = [ex["caption"] for ex in test]
  attributes = [ex["attributes"] for ex in test]
  held_out = [bool(ex["held_out"]) for ex in test]
  real64 = np.stack([ex["image"] for ex in test])
  # The SR stage's real low-res inputs, derived exactly as in training (data.preprocess).
  real32 = np.stack([preprocess.resize(x, 32, 32) for x in real64])

  model = cascade.Cascade.from_workdirs([base_dir, sr_dir])
  s1, s2 = cascade.stage_settings(cascade_cfg, 2)
  w = s1.guidance_weight
  print(f"\n== sampling {len(prompts)} held-out test prompts at w = {w} and w = 1", flush=True)
  guided = model.sample(prompts, [s1, s2], seed=0)
  unguided = model.sample(prompts, [dataclasses.replace(s1, guidance_weight=1.0), s2], seed=0)
  print("== SR stage alone on real low-res test images", flush=True)
  (sr_real,) = model.sample(prompts, [s2], seed=0, lowres=preprocess.to_float(real32))
  timings = {"sampling_s": round(time.time() - t0, 1)}

  u8 = images.to_uint8
  t0 = time.time()
  bicubic = np.stack([preprocess.resize(x, 64, 64) for x in real32])
  report = {
      "settings": {
          "stage1": vars(s1),
          "stage2": vars(s2),
          "num_test_prompts": len(prompts),
          "stage_checkpoint_steps": [s.step for s in model.stages],
      },
      "alignment": {
          f"w={w}": {
              "stage1": _scores(u8(guided[0]), attributes, held_out),
              "stage2": _scores(u8(guided[1]), attributes, held_out),
          },
          "w=1": {
              "stage1": _scores(u8(unguided[0]), attributes, held_out),
              "stage2": _scores(u8(unguided[1]), attributes, held_out),
          },
          "real_images": _scores(real64, attributes, held_out)["all"],
      },
      "super_resolution_on_real_lowres": {
          "psnr_db": round(image_metrics.psnr(u8(sr_real), real64), 2),
          "bicubic_psnr_db": round(image_metrics.psnr(bicubic, real64), 2),
          "edge_sharpness_p99": {
              "sr_stage": round(image_metrics.edge_sharpness(u8(sr_real)), 2),
              "bicubic": round(image_metrics.edge_sharpness(bicubic), 2),
              "real": round(image_metrics.edge_sharpness(real64), 2),
          },
          "alignment_of_sr_outputs": _scores(u8(sr_real), attributes, held_out)["all"],
      },
      "chance": shapes_metric.CHANCE,
  }
  n = min(grid_rows, len(prompts))
  rows = [[u8(guided[0][i]), u8(guided[1][i]), u8(unguided[1][i]), real64[i]] for i in range(n)]
  labels = [("[held-out] " if held_out[i] else "") + prompts[i] for i in range(n)]
  sheet = images.labelled_grid(
      rows, labels, [f"stage 1 (w={w})", f"stage 2 (w={w})", "stage 2 (w=1)", "real 64x64"]
  )
  atomic.save_png(os.path.join(out_dir, "samples.png"), sheet)
  timings["scoring_s"] = round(time.time() - t0, 1)
  report["timings"] = timings
  return report


def main(argv):
  del argv
  start = time.time()
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  print(
      f"imagen-jax demo: shapes dataset -> base 32x32 stage -> SR 32->64 stage -> samples.\n"
      f"Expected time on a 2-core CPU: {EXPECTED_MINUTES} minutes (about half of it the base "
      f"stage, a third the SR stage; more on a loaded host). Output: {workdir}",
      flush=True,
  )

  # Checked before any work: the pretrained encoder's files come from `make minilm`.
  missing = registry.missing_default_weights(_TEXT_NAME.value)
  if missing:
    raise SystemExit(
        f"--text_name: {missing}; `make demo` fetches it, or pass --text_name="
        f"{registry.TINY_RANDOM} (nothing to fetch)."
    )

  timings = {}
  data_dir = os.path.join(workdir, "data")
  base_cfg = base64_config.get_config(_stage_arg())
  sr_cfg = sr256_config.get_config(_stage_arg())
  cascade_cfg = cascade_config.get_config(VARIANT)
  # What the demo sets on the stage configs, as the trainer's --config.* flags.
  overrides = {}
  for name, cfg, steps in (("base", base_cfg, _BASE_STEPS.value), ("sr", sr_cfg, _SR_STEPS.value)):
    with cfg.unlocked():
      cfg.data.data_dir = data_dir
      if steps is not None:
        cfg.train.num_steps = steps
    overrides[name] = {"data.data_dir": data_dir, "train.num_steps": int(cfg.train.num_steps)}

  # 1. Data: the same scenes at both resolutions (examples depend on (seed, split, index)).
  t0 = time.time()
  print("\n== building the shapes dataset (32x32 and 64x64)", flush=True)
  builders = {}
  for cfg in (base_cfg, sr_cfg):
    builders[int(cfg.data.resolution)] = shapes.build_from_config(cfg.data, data_dir)
  timings["dataset_s"] = round(time.time() - t0, 1)
  # 1b. The text encoder is frozen: encode each distinct training caption once.
  t0 = time.time()
  print("\n== text-embedding cache of the distinct training captions", flush=True)
  for name, cfg in (("base", base_cfg), ("sr", sr_cfg)):
    overrides[name]["text.embedding_cache"] = shapes.build_text_cache(cfg, data_dir)
  timings["text_cache_s"] = round(time.time() - t0, 1)
  # 2. Train both stages (each resumes from its latest checkpoint).
  base_dir, sr_dir = os.path.join(workdir, "base"), os.path.join(workdir, "sr")
  train_stage("base", base64_config, overrides["base"], base_dir, timings)
  train_stage("sr", sr256_config, overrides["sr"], sr_dir, timings)

  # 3. Sample and score; 4. write the sheet and the report.
  report = evaluate(
      base_dir,
      sr_dir,
      builders[int(sr_cfg.data.resolution)],
      cascade_cfg,
      workdir,
      num_test=_NUM_TEST.value,
      grid_rows=_GRID_ROWS.value,
  )
  report["settings"].update(
      base_steps=int(base_cfg.train.num_steps),
      sr_steps=int(sr_cfg.train.num_steps),
      base_target=base_cfg.diffusion.target,
      sr_target=sr_cfg.diffusion.target,
  )
  timings.update(report.pop("timings"))
  timings["total_s"] = round(time.time() - start, 1)
  report["timings"] = timings
  atomic.write_json(os.path.join(workdir, "report.json"), report)
  a = report["alignment"][f"w={report['settings']['stage1']['guidance_weight']}"]["stage2"]["all"]
  print(
      f"\nstage 2: colour {a['color']:.3f}, shape {a['shape']:.3f}; SR PSNR "
      f"{report['super_resolution_on_real_lowres']['psnr_db']} dB. Wrote {workdir}/samples.png "
      f"and report.json in {timings['total_s'] / 60:.1f} min."
  )


if __name__ == "__main__":
  cli.run(main)
