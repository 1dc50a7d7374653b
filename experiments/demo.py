"""The built-in demo (`make demo`): a small text-to-image cascade trained on the CPU.

1. Builds the offline shapes dataset (imagen_jax.data.shapes) at 32x32 and 64x64: the same
   scenes, so 32 -> 64 is a real super-resolution task. The frozen text encoder embeds each
   distinct training caption once (a `text.embedding_cache` both stages read).
2. Trains the `shapes` base stage (configs/base64.py:shapes, 32x32 text->image) and the
   `shapes` SR stage (configs/sr256.py:shapes, 32->64, text-conditioned, with noise
   conditioning augmentation) for fixed step budgets.
3. Samples the held-out test prompts through the cascade at the demo's guidance weight and at
   w = 1 (no guidance), scores every image with the exact shapes alignment metric
   (imagen_jax.evals.shapes_metric), separately on colour+kind combinations never seen in
   training; runs the SR stage alone on real low-res test images for PSNR and edge sharpness
   against bicubic upsampling and the real images.
4. Writes `samples.png` (prompt | stage 1 | stage 2) and `report.json` into --workdir.

Everything resumes: a second `make demo` reuses the dataset and the finished checkpoints.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "demo_out", "where data, checkpoints and results go")
_BASE_STEPS = flags.DEFINE_integer("base_steps", None, "override the base stage's steps")
_SR_STEPS = flags.DEFINE_integer("sr_steps", None, "override the SR stage's steps")
_NUM_TEST = flags.DEFINE_integer("num_test", 192, "test prompts to sample and score")
_GRID_ROWS = flags.DEFINE_integer("grid_rows", 16, "prompts shown in samples.png")

# Wall time from a fresh clone on the 2-core CPU (2.1 GHz VM), after the install (2026-11-27):
# 28.7 minutes at 1023645 (dataset 0.5, text cache 0.2, base 15.6 at median 2.8 steps/s, SR
# 9.2 at 3.9 steps/s, sampling + scoring 3.3); 26.9 at 22239e7; 31.7 an hour before that in a
# slow window of the VM (the unchanged dataset build took 38% longer). The VM's speed varies by
# that much hour to hour.
EXPECTED_MINUTES = 30

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, variant: str):
  """`configs/<file>.py:<variant>` from the repo (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      f"imagen_configs_{os.path.basename(path)[:-3]}", os.path.join(REPO, path)
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def edge_sharpness(images_u8) -> float:
  """99th percentile of the image-gradient magnitude (finite differences, luminance, 0-255).

  The mean gradient does not separate sharp from blurred edges here (the images are mostly flat
  background); the top percentile measures how steep the edges are.
  """
  import numpy as np

  x = np.asarray(images_u8, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
  gx = x[:, :, 1:] - x[:, :, :-1]
  gy = x[:, 1:, :] - x[:, :-1, :]
  mag = np.sqrt(gx[:, :-1, :] ** 2 + gy[:, :, :-1] ** 2)
  return float(np.percentile(mag, 99))


def psnr(a_u8, b_u8) -> float:
  """Mean over images of 10 log10(255^2 / MSE)."""
  import numpy as np

  mse = np.mean((np.asarray(a_u8, np.float64) - np.asarray(b_u8, np.float64)) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def _scores(images, attributes, held_out):
  from imagen_jax.evals import shapes_metric

  s = shapes_metric.score_images(list(images), attributes, held_out)
  r = lambda d: {k: round(v, 4) for k, v in d.items()}  # noqa: E731
  return {
      "all": r(s["mean"]),
      "held_out_combinations": r(s["held_out"]),
      "seen_combinations": r(s["seen"]),
      "num": s["num"],
      "num_held_out": s["num_held_out"],
  }


def build_text_cache(config, data_dir: str) -> str:
  """Writes (or reuses) the embeddings of the stage's distinct training captions, keyed by the
  caption text; returns the cache directory (for `text.embedding_cache`)."""
  from imagen_jax.data import shapes
  from imagen_jax.text import cache as text_cache
  from imagen_jax.text import registry

  d, t = config.data, config.text
  path = os.path.join(
      data_dir,
      f"text_cache_{t.name}_L{int(t.max_length)}_n{int(d.num_train)}" f"_seed{int(d.shapes_seed)}",
  )
  wanted = sorted(set(shapes.captions(int(d.shapes_seed), "train", int(d.num_train))))
  encoder = registry.get_text_encoder(t)
  if os.path.exists(os.path.join(path, text_cache.MANIFEST)):
    existing = text_cache.TextEmbeddingCache(path)
    # Reused only when written by these very weights (an older checkout's cache is rewritten).
    reusable = existing.manifest.get("fingerprint") == encoder.fingerprint and all(
        c in existing for c in wanted
    )
    existing.close()
    if reusable:
      return path
  print(f"\n== encoding the {len(wanted)} distinct training captions once -> {path}", flush=True)
  text_cache.write_cache(encoder, [(c, c) for c in wanted], path, overwrite=True)
  return path


def train_stage(name, config, workdir, timings):
  from imagen_jax import checkpoint as ckpt_lib
  from imagen_jax.train import trainer

  t0 = time.time()
  print(
      f"\n== training the {name} stage: {config.train.num_steps} steps at batch "
      f"{config.train.global_batch_size} -> {workdir}",
      flush=True,
  )
  try:
    trainer.train_and_evaluate(config, workdir)
  except ckpt_lib.CheckpointMismatchError as e:
    # Most likely a demo_out from an older checkout whose stage networks have since changed.
    raise SystemExit(
        f"{workdir} holds a {name} checkpoint of another network ({e}). Delete "
        f"{workdir} (or run with another --workdir) to train the current one."
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
  import numpy as np

  from imagen_jax import cascade, visualize
  from imagen_jax.data import preprocess, shapes
  from imagen_jax.evals import shapes_metric

  t0 = time.time()
  test = shapes.read_examples(builder64, "test", limit=num_test)
  prompts = [ex["caption"] for ex in test]
  attributes = [ex["attributes"] for ex in test]
  held_out = [bool(ex["held_out"]) for ex in test]
  real64 = np.stack([ex["image"] for ex in test])
  # The SR stage's real low-res inputs, derived exactly as in training (data.preprocess).
  real32 = np.stack([preprocess.resize(x, 32, 32) for x in real64])

  model = cascade.Cascade.from_workdirs([base_dir, sr_dir])
  s1 = cascade.SamplingSettings.from_config(cascade_cfg.stage1)
  s2 = cascade.SamplingSettings.from_config(cascade_cfg.stage2)
  w = s1.guidance_weight
  print(f"\n== sampling {len(prompts)} held-out test prompts at w = {w} and w = 1", flush=True)
  guided = model.sample(prompts, [s1, s2], seed=0)
  unguided = model.sample(
      prompts, [cascade.dataclasses.replace(s1, guidance_weight=1.0), s2], seed=0
  )
  print("== SR stage alone on real low-res test images", flush=True)
  (sr_real,) = model.sample(prompts, [s2], seed=0, lowres=preprocess.to_float(real32))
  timings = {"sampling_s": round(time.time() - t0, 1)}

  u8 = cascade.to_uint8
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
          "psnr_db": round(psnr(u8(sr_real), real64), 2),
          "bicubic_psnr_db": round(psnr(bicubic, real64), 2),
          "edge_sharpness_p99": {
              "sr_stage": round(edge_sharpness(u8(sr_real)), 2),
              "bicubic": round(edge_sharpness(bicubic), 2),
              "real": round(edge_sharpness(real64), 2),
          },
          "alignment_of_sr_outputs": _scores(u8(sr_real), attributes, held_out)["all"],
      },
      "chance": shapes_metric.CHANCE,
  }
  n = min(grid_rows, len(prompts))
  rows = [[u8(guided[0][i]), u8(guided[1][i]), u8(unguided[1][i]), real64[i]] for i in range(n)]
  labels = [("[held-out] " if held_out[i] else "") + prompts[i] for i in range(n)]
  sheet = visualize.labelled_grid(
      rows, labels, [f"stage 1 (w={w})", f"stage 2 (w={w})", "stage 2 (w=1)", "real 64x64"]
  )
  sheet.save(os.path.join(out_dir, "samples.png"))
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
      f"Expected time on a 2-core CPU: about {EXPECTED_MINUTES} minutes (dataset ~0.5, text "
      f"cache ~0.2, base stage ~15, SR stage ~9, sampling + scoring ~3; more on a loaded "
      f"host). Output: {workdir}",
      flush=True,
  )

  from imagen_jax.data import shapes

  timings = {}
  data_dir = os.path.join(workdir, "data")
  base_cfg = load_config("configs/base64.py", "shapes")
  sr_cfg = load_config("configs/sr256.py", "shapes")
  cascade_cfg = load_config("configs/cascade.py", "shapes")
  for cfg, steps in ((base_cfg, _BASE_STEPS.value), (sr_cfg, _SR_STEPS.value)):
    with cfg.unlocked():
      cfg.data.data_dir = data_dir
      if steps is not None:
        cfg.train.num_steps = steps

  # 1. Data: the same scenes at both resolutions (examples depend on (seed, split, index)).
  t0 = time.time()
  print("\n== building the shapes dataset (32x32 and 64x64)", flush=True)
  builders = {}
  for cfg in (base_cfg, sr_cfg):
    d = cfg.data
    builders[int(d.resolution)] = shapes.build_shapes(
        data_dir,
        int(d.resolution),
        num_train=int(d.num_train),
        num_test=int(d.num_test),
        seed=int(d.shapes_seed),
    )
  timings["dataset_s"] = round(time.time() - t0, 1)
  # 1b. The text encoder is frozen: encode each distinct training caption once.
  t0 = time.time()
  for cfg in (base_cfg, sr_cfg):
    with cfg.unlocked():
      cfg.text.embedding_cache = build_text_cache(cfg, data_dir)
  timings["text_cache_s"] = round(time.time() - t0, 1)
  # 2. Train both stages (each resumes from its latest checkpoint).
  base_dir, sr_dir = os.path.join(workdir, "base"), os.path.join(workdir, "sr")
  train_stage("base", base_cfg, base_dir, timings)
  train_stage("sr", sr_cfg, sr_dir, timings)

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
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  a = report["alignment"][f"w={report['settings']['stage1']['guidance_weight']}"]["stage2"]["all"]
  print(
      f"\nstage 2: colour {a['color']:.3f}, shape {a['shape']:.3f}; SR PSNR "
      f"{report['super_resolution_on_real_lowres']['psnr_db']} dB. Wrote {workdir}/samples.png "
      f"and report.json in {timings['total_s'] / 60:.1f} min."
  )


if __name__ == "__main__":
  app.run(main)
