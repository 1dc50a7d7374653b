"""Paper claim 3 in miniature: noise conditioning augmentation (Imagen §2.4, App. D.2).

An SR stage is conditioned on the previous stage's output x_lr, upsampled and corrupted by the
variance-preserving forward process at an augmentation level aug in [0, 1]
(`diffusion.forward.noise_condition_augment`), and told aug:

    lowres = cos(pi/2 aug) up(x_lr) + sin(pi/2 aug) eps,   eps ~ N(0, I)

In training aug is drawn per example (`diffusion.aug_level` = (lo, hi): aug ~ U(lo, hi)); at
sampling it is a setting (`SamplingSettings.aug_level`). The paper finds the augmentation
"critical for generating high fidelity images" (§2.4): an SR stage trained only on real low-res
images meets the base stage's samples, with their artifacts, at sampling time; the noise hides
the difference. Sampling aug 0 gives the best FID, 0.1-0.3 the best-looking samples (App. D.2).

What this runs, on the demo's shapes cascade (32x32 base -> 64x64 SR):

1. The stages: the demo's base stage and SR stage (trained with aug ~ U(0, 0.5)), read from
   --demo_dir (`make demo` writes demo_out/base and demo_out/sr; read only); either one absent is
   trained into --outdir with the demo's settings. One more SR stage is trained the same way
   (same config, steps, seed, data and text cache) WITHOUT augmentation
   (`diffusion.aug_level=(0.0, 0.0)`: aug is always 0) into <outdir>/sr_noaug. Training is the
   real trainer in a child process (`cli_runner.train_stage`) and resumes its workdir.
2. The base stage samples --num_prompts held-out test prompts once, at the cascade config's
   stage-1 settings (configs/cascade.py:shapes: w = 3, DDIM 25 steps, dynamic thresholding);
   the samples are kept in <outdir>/base_samples.npz.
3. Each SR stage upsamples them at every sampling aug level of --aug_levels (stage-2 settings
   otherwise; one seed for all, so the levels differ only in aug), and upsamples the REAL low-res
   test images at the same levels, the demo's reference task.
4. Scores: the exact shapes metric at the SR resolution on the outputs from the base samples
   (colour, shape, exact, exact on never-seen colour+kind pairs), their edge sharpness (p99
   gradient magnitude, `evals.image_metrics`, a fidelity proxy: the real 64x64 images have
   steeper edges than blurred upsamples), and on real low-res inputs the PSNR against the real
   images. References: the base samples scored at their own size and bicubic-upsampled, the
   real images, bicubic upsampling of the real low-res images.

Writes into --outdir: rows.jsonl (one row per (SR stage, aug level)), table.md, aug_sweep.png
(metrics vs aug level, one line per SR stage), grid_<stage>.png (a few prompts: base sample | SR
at each aug level | real image) and the sample sets under samples/ (npz, each keyed by what made
it). A rerun recomputes nothing that is finished: the samples and rows whose key (stage
checkpoint step, settings, prompts) is unchanged are reused.

  python experiments/claim_noise_aug.py --outdir=claims_out/noise_aug --demo_dir=demo_out

The stage configs default to the random encoder (byt5-tiny-random): on a demo trained with
another (`make demo` uses all-minilm-l6-v2) add `--sr_config.text.name=all-minilm-l6-v2`, or
run the demo with `--text_name=byt5-tiny-random` (the results in docs/results/paper_claims.md).

Smaller runs: --num_prompts, --aug_levels, --sr_steps; the stage configs and the sampling
settings take `--base_config.*`, `--sr_config.*` and `--cascade.*` overrides (a tiny cascade:
tests/test_claim_noise_aug.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from imagen_jax import atomic, cli, cli_runner, images
from imagen_jax import checkpoint as ckpt_lib
from imagen_jax.data import preprocess, shapes
from imagen_jax.evals import image_metrics, shapes_metric
from imagen_jax.sampling import cascade

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line; defined when run as a script (tests import the module's functions,
  and several scripts' flags share names)."""
  config_flags.DEFINE_config_file(
      "base_config", "configs/base64.py:shapes", "base stage config (when trained here)"
  )
  config_flags.DEFINE_config_file(
      "sr_config", "configs/sr256.py:shapes", "SR stage config, with its training aug range"
  )
  config_flags.DEFINE_config_file(
      "cascade", "configs/cascade.py:shapes", "sampling settings: stage1 (base), stage2 (SR)"
  )
  flags.DEFINE_string("outdir", None, "where workdirs, samples and results go", required=True)
  flags.DEFINE_string(
      "demo_dir", "demo_out", "read-only: the demo's trained base/ and sr/ stages, if present"
  )
  flags.DEFINE_string("data_dir", "", "shapes dataset and text cache; '' = <outdir>/data")
  flags.DEFINE_list(
      "aug_levels", ["0", "0.1", "0.2", "0.3", "0.5"], "sampling aug levels in [0, 1] (§2.4)"
  )
  flags.DEFINE_integer("num_prompts", 192, "held-out test prompts")
  flags.DEFINE_integer("base_steps", None, "base training steps (when trained here)")
  flags.DEFINE_integer(
      "sr_steps",
      None,
      "SR training steps; default: the with-aug stage's (the config's if trained here)",
  )
  flags.DEFINE_integer("grid_rows", 6, "prompts shown in each grid_<stage>.png")


# The two SR stages compared: the one trained with augmentation, the one trained without.
WITH, WITHOUT = "with_aug", "without_aug"
NO_AUG = (0.0, 0.0)  # diffusion.aug_level (lo, hi): aug ~ U(0, 0) = 0, the network always sees 0
# Training settings that must agree between the two SR stages for a fair comparison (the
# diffusion block but its aug range is compared field by field).
_SAME_FIELDS = ("stage", "model", "image_size", "lowres_size", "text.name", "text.max_length")
_SAME_TRAIN = ("train.num_steps", "train.seed", "train.global_batch_size", "train.ema_decay")


def parse_aug_levels(values) -> list[float]:
  """--aug_levels -> floats in [0, 1], in the order given; raises ValueError naming a bad one."""
  out = []
  for v in values:
    try:
      a = float(v)
    except (TypeError, ValueError):
      raise ValueError(f"--aug_levels: {v!r} is not a number; allowed: numbers in [0, 1]") from None
    if not 0.0 <= a <= 1.0:
      raise ValueError(
          f"--aug_levels: {v!r} is outside [0, 1] (the noise conditioning augmentation level of "
          "§2.4: 0 = the low-res input as is, 1 = pure noise)"
      )
    if a in out:
      raise ValueError(f"--aug_levels: {v!r} is given twice")
    out.append(a)
  if not out:
    raise ValueError("--aug_levels is empty; give at least one level in [0, 1]")
  return out


def trained_step(workdir: str) -> int | None:
  """The latest complete checkpoint step of a stage workdir, or None (no config / checkpoint)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not (os.path.exists(os.path.join(workdir, "config.json")) and os.path.isdir(ckpt_dir)):
    return None
  ck = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
  try:
    return ck.latest_step()
  finally:
    ck.close()


def _get(config: dict, path: str):
  for k in path.split("."):
    config = config.get(k) if isinstance(config, dict) else None
  return config


def config_differences(a: dict, b: dict) -> list[str]:
  """Where two SR stages' recorded configs differ on what the comparison holds fixed:
  "field: a vs b" for the network, sizes, text encoder, diffusion (but its aug range) and the
  training budget / seed / batch / EMA."""
  diffusion = (set(a.get("diffusion", {})) | set(b.get("diffusion", {}))) - {"aug_level"}
  fields = _SAME_FIELDS + tuple(f"diffusion.{k}" for k in sorted(diffusion))
  return [
      f"{f}: {_get(a, f)!r} vs {_get(b, f)!r}"
      for f in fields + _SAME_TRAIN
      if json.dumps(_get(a, f), sort_keys=True) != json.dumps(_get(b, f), sort_keys=True)
  ]


def _key(**fields) -> str:
  """What made a cached result (stage workdirs and steps, settings, prompts): a hash of it."""
  text = json.dumps(fields, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_npz(path: str, key: str, compute, counter: dict) -> np.ndarray:
  """`images` of `path` when its recorded key is `key`; else `compute()`, saved atomically."""
  if os.path.exists(path):
    with np.load(path) as f:
      if str(f["key"]) == key:
        return f["images"]
    print(f"   {os.path.basename(path)} was made by other settings: recomputing it", flush=True)
  out = np.asarray(compute())
  atomic.save_npz(path, compressed=True, images=out, key=np.asarray(key))
  counter["sample_sets"] += 1
  return out


def write_if_changed(path: str, text: str) -> None:
  """Atomically writes `text` unless `path` holds it already (a rerun leaves finished files)."""
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
  atomic.write_text(path, text)


def _scores(images_u8, test) -> dict:
  s = shapes_metric.score_images(
      list(images_u8), [e["attributes"] for e in test], [e["held_out"] for e in test]
  )
  held = s["held_out"]["exact"]
  return {
      "colour": round(s["mean"]["color"], 4),
      "shape": round(s["mean"]["shape"], 4),
      "exact": round(s["mean"]["exact"], 4),
      # None when no prompt has a never-seen colour+kind pair (JSON has no NaN).
      "held_exact": None if np.isnan(held) else round(held, 4),
  }


def score_row(stage: str, aug: float, sr_of_samples, sr_of_real, real_u8, test) -> dict:
  """One (SR stage, aug level) row: shapes metric and edge sharpness of the SR outputs of the
  base samples; PSNR and edge sharpness of the SR outputs of the real low-res images."""
  return dict(
      stage=stage,
      aug=aug,
      **_scores(sr_of_samples, test),
      edge_p99=round(image_metrics.edge_sharpness(sr_of_samples), 2),
      real_psnr_db=round(image_metrics.psnr(sr_of_real, real_u8), 2),
      real_edge_p99=round(image_metrics.edge_sharpness(sr_of_real), 2),
      n=len(test),
  )


def references(base_samples, real_u8, lowres_size: int, test) -> dict:
  """What the rows compare with: the base samples at their size and bicubic-upsampled, the real
  images, bicubic upsampling of the real low-res images."""
  size = real_u8.shape[1]
  up = lambda xs: np.stack([preprocess.resize(x, size, size) for x in xs])  # noqa: E731
  samples_u8 = images.to_uint8(base_samples)
  real_lowres = np.stack([preprocess.resize(x, lowres_size, lowres_size) for x in real_u8])
  return {
      "base_samples": _scores(samples_u8, test),
      "base_samples_bicubic": dict(
          _scores(up(samples_u8), test),
          edge_p99=round(image_metrics.edge_sharpness(up(samples_u8)), 2),
      ),
      "real": dict(
          _scores(real_u8, test), edge_p99=round(image_metrics.edge_sharpness(real_u8), 2)
      ),
      "real_lowres_bicubic": {
          "psnr_db": round(image_metrics.psnr(up(real_lowres), real_u8), 2),
          "edge_p99": round(image_metrics.edge_sharpness(up(real_lowres)), 2),
      },
  }


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.3f}"


def table(rows, refs: dict, settings: dict) -> str:
  """Markdown: one line per (SR stage, aug level), then the references and the settings."""
  lines = [
      "Noise conditioning augmentation (Imagen §2.4): the SR stage fed the base stage's samples "
      "(alignment, edge sharpness) and the real low-res images (PSNR), per sampling aug level.",
      "",
      "| SR stage | sampling aug | exact | colour | shape | exact (never-seen) | edge p99 "
      "| PSNR on real low-res (dB) | edge p99 on real low-res |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['stage'].replace('_', ' ')} | {r['aug']:g} | {r['exact']:.3f} | {r['colour']:.3f} "
        f"| {r['shape']:.3f} | {_fmt(r['held_exact'])} | {r['edge_p99']:.1f} | "
        f"{r['real_psnr_db']:.2f} | {r['real_edge_p99']:.1f} |"
    )
  b, bb, real, rb = (
      refs["base_samples"],
      refs["base_samples_bicubic"],
      refs["real"],
      refs["real_lowres_bicubic"],
  )
  lines += [
      "",
      f"References: base samples at their size: exact {b['exact']:.3f}, colour {b['colour']:.3f}, "
      f"shape {b['shape']:.3f}; bicubic-upsampled: exact {bb['exact']:.3f}, edge p99 "
      f"{bb['edge_p99']:.1f}. Real images: exact {real['exact']:.3f}, edge p99 "
      f"{real['edge_p99']:.1f}. Bicubic upsampling of the real low-res images: PSNR "
      f"{rb['psnr_db']:.2f} dB, edge p99 {rb['edge_p99']:.1f}.",
      "",
      "Settings: " + json.dumps(settings, sort_keys=True),
  ]
  return "\n".join(lines) + "\n"


def plot(rows, refs: dict, path: str, sizes: tuple[int, int]) -> None:
  """aug_sweep.png: exact match, edge sharpness (base samples) and PSNR (real low-res) against
  the sampling aug level, one line per SR stage; dotted: the references."""
  import matplotlib  # deferred: a 1 s import that only the plot needs

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after use("Agg"): no display needed

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  panels = (
      ("exact", "exact match (base samples -> SR)", refs["base_samples_bicubic"]["exact"]),
      ("edge_p99", "edge sharpness p99 (base samples -> SR)", refs["real"]["edge_p99"]),
      ("real_psnr_db", "PSNR dB (real low-res -> SR)", refs["real_lowres_bicubic"]["psnr_db"]),
  )
  ref_names = ("bicubic of base samples", "real images", "bicubic")
  for ax, (field, title, ref), ref_name in zip(axes, panels, ref_names):
    for stage, style in ((WITH, "o-"), (WITHOUT, "s--")):
      pts = sorted((r["aug"], r[field]) for r in rows if r["stage"] == stage)
      if pts:
        ax.plot(*zip(*pts), style, label=f"trained {stage.replace('_', ' ')}")
    ax.axhline(ref, color="grey", linestyle=":", label=ref_name)
    ax.set_xlabel("sampling aug level")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
  fig.suptitle(
      f"Noise conditioning augmentation (Imagen §2.4), shapes cascade {sizes[0]} -> {sizes[1]}"
  )
  fig.tight_layout()
  atomic.save_figure(path, fig, dpi=100)
  plt.close(fig)


def grid(base_samples, sr_by_level: dict, real_u8, test, rows: int) -> object:
  """A labelled sheet: per prompt, the base sample | SR at each aug level | the real image."""
  n = min(rows, len(test))
  levels = sorted(sr_by_level)
  cells = [[base_samples[i], *(sr_by_level[a][i] for a in levels), real_u8[i]] for i in range(n)]
  labels = [("[never-seen] " if test[i]["held_out"] else "") + test[i]["caption"] for i in range(n)]
  return images.labelled_grid(
      cells, labels, ["base sample", *(f"aug {a:g}" for a in levels), "real"], cell=96
  )


def _train(config_flag, config, workdir: str, overrides: dict, name: str) -> None:
  """Trains (or resumes) one stage with the real trainer; skipped when already at its steps."""
  steps = int(overrides.get("train.num_steps", config.train.num_steps))
  done = trained_step(workdir)
  if done is not None and done >= steps:
    return
  print(f"\n== training the {name} stage: {steps} steps -> {workdir}", flush=True)
  try:
    cli_runner.train_stage(config_flags.get_config_filename(config_flag), workdir, overrides)
  except cli_runner.TrainingFailed as e:
    raise SystemExit(
        f"training the {name} stage failed ({e}); if its checkpoint is of another network, "
        f"delete {workdir}"
    ) from e


def check_demo_sr(recorded: dict, sr_config: dict, sr_steps: int) -> None:
  """Before training: the demo's SR stage was trained with augmentation, and the without-aug
  stage about to be trained (`sr_config` at `sr_steps`, aug range (0, 0)) is the same stage
  otherwise (network, sizes, text encoder, diffusion); raises UsageError naming a difference
  (e.g. configs changed since the demo ran). Training-budget differences are only reported."""
  aug = tuple(recorded["diffusion"]["aug_level"])
  if aug[1] <= 0.0:
    raise app.UsageError(
        f"the demo's SR stage was trained without augmentation (diffusion.aug_level={aug}); "
        "the comparison needs one trained with it"
    )
  planned = json.loads(json.dumps(sr_config))
  planned["train"]["num_steps"], planned["diffusion"]["aug_level"] = sr_steps, list(NO_AUG)
  meaning = [d for d in config_differences(recorded, planned) if not d.startswith("train.")]
  if meaning:
    raise app.UsageError(
        "the SR stage to train without augmentation would differ from the demo's beyond its aug "
        f"range ({'; '.join(meaning)}; demo's first): set those with --sr_config.<field>=..., or "
        "rerun the demo with the current configs"
    )


def prepare_stages(outdir: str, demo_dir: str, data_dir: str) -> dict:
  """The three stage workdirs (base, SR with aug, SR without), training what is missing; returns
  {"base": dir, WITH: dir, WITHOUT: dir, "data": builder at the SR resolution}."""
  base_cfg, sr_cfg = FLAGS.base_config, FLAGS.sr_config
  user = {n: config_flags.get_override_values(flags.FLAGS[n]) for n in ("base_config", "sr_config")}
  for cfg in (base_cfg, sr_cfg):
    with cfg.unlocked():
      cfg.data.data_dir = data_dir
  demo = {n: os.path.join(os.path.abspath(demo_dir), n) for n in ("base", "sr")}
  dirs = {
      "base": demo["base"] if trained_step(demo["base"]) is not None else f"{outdir}/base",
      WITH: demo["sr"] if trained_step(demo["sr"]) is not None else f"{outdir}/sr_aug",
      WITHOUT: os.path.join(outdir, "sr_noaug"),
  }
  # The same scenes at both sizes (seeded per example); the base size only to train it here.
  for cfg in (sr_cfg,) if dirs["base"] == demo["base"] else (base_cfg, sr_cfg):
    dirs["data"] = shapes.build_from_config(cfg.data, data_dir)
  sr_steps = FLAGS.sr_steps
  if sr_steps is None and dirs[WITH] == demo["sr"]:
    sr_steps = int(cascade.read_stage_config(demo["sr"]).train.num_steps)
  sr_steps = int(sr_cfg.train.num_steps) if sr_steps is None else sr_steps
  if dirs[WITH] == demo["sr"]:
    check_demo_sr(cascade.read_stage_config(demo["sr"]).to_dict(), sr_cfg.to_dict(), sr_steps)
  base_steps = int(base_cfg.train.num_steps) if FLAGS.base_steps is None else FLAGS.base_steps
  common = {"data.data_dir": data_dir}
  if dirs["base"] != demo["base"]:
    overrides = {
        **user["base_config"],
        **common,
        "train.num_steps": base_steps,
        "text.embedding_cache": shapes.build_text_cache(base_cfg, data_dir),
    }
    _train(flags.FLAGS["base_config"], base_cfg, dirs["base"], overrides, "base")
  sr_overrides = {
      **user["sr_config"],
      **common,
      "train.num_steps": sr_steps,
      "text.embedding_cache": shapes.build_text_cache(sr_cfg, data_dir),
  }
  if dirs[WITH] != demo["sr"]:
    _train(flags.FLAGS["sr_config"], sr_cfg, dirs[WITH], sr_overrides, "SR (with aug)")
  sr_overrides["diffusion.aug_level"] = NO_AUG
  _train(flags.FLAGS["sr_config"], sr_cfg, dirs[WITHOUT], sr_overrides, "SR (without aug)")
  return dirs


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    levels = parse_aug_levels(FLAGS.aug_levels)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if FLAGS.num_prompts < 1:
    raise app.UsageError(f"--num_prompts={FLAGS.num_prompts}; allowed: >= 1")
  start = time.time()
  outdir = os.path.abspath(FLAGS.outdir)
  data_dir = os.path.abspath(FLAGS.data_dir or os.path.join(outdir, "data"))
  os.makedirs(os.path.join(outdir, "samples"), exist_ok=True)
  dirs = prepare_stages(outdir, FLAGS.demo_dir, data_dir)
  train_s = round(time.time() - start, 1)

  configs = {k: cascade.read_stage_config(dirs[k]).to_dict() for k in ("base", WITH, WITHOUT)}
  aug_ranges = {k: tuple(configs[k]["diffusion"]["aug_level"]) for k in (WITH, WITHOUT)}
  if aug_ranges[WITH][1] <= 0.0:
    raise app.UsageError(
        f"the SR stage in {dirs[WITH]} was trained without augmentation "
        f"(diffusion.aug_level={aug_ranges[WITH]}); the comparison needs one trained with it"
    )
  steps = {k: trained_step(dirs[k]) for k in ("base", WITH, WITHOUT)}
  differences = config_differences(configs[WITH], configs[WITHOUT])
  if steps[WITH] != steps[WITHOUT]:
    differences.append(f"checkpoint step: {steps[WITH]} vs {steps[WITHOUT]}")
  for d in differences:
    print(f"warning: the two SR stages differ beyond their aug range: {d}", flush=True)

  test = shapes.read_examples(dirs["data"], "test", limit=FLAGS.num_prompts)
  prompts = [e["caption"] for e in test]
  real_u8 = np.stack([e["image"] for e in test])
  lowres_size = int(configs[WITH]["lowres_size"])
  if real_u8.shape[1] != int(configs[WITH]["image_size"]):
    raise app.UsageError(
        f"the SR stages make {configs[WITH]['image_size']}px images but the test images are "
        f"{real_u8.shape[1]}px: set --sr_config.data.resolution to the stage's image_size"
    )
  # The SR stage's real low-res inputs, derived as in training (data.preprocess).
  real_lowres = np.stack(
      [preprocess.to_float(preprocess.resize(x, lowres_size, lowres_size)) for x in real_u8]
  )
  c = FLAGS.cascade
  s1, s2 = cascade.stage_settings(c, 2)
  seed, batch = int(c.seed), int(c.batch_size)
  counter = {"sample_sets": 0, "rows": 0}
  loaded, models = {}, {}

  def load(k):  # each stage loaded once, only when a sample set is missing
    if k not in loaded:
      loaded[k] = cascade.load_stage(dirs[k])
    return loaded[k]

  def run_sr(k, settings, lowres):
    if k not in models:  # one cascade per SR stage: its jitted samplers are reused
      models[k] = cascade.Cascade([load("base"), load(k)])
    (out,) = models[k].sample(
        prompts, [settings], seed=seed, batch_size=batch, lowres=lowres, progress=False
    )
    return images.to_uint8(out)

  print(f"\n== base stage: {len(prompts)} test prompts at w = {s1.guidance_weight}", flush=True)
  base_key = _key(
      workdir=dirs["base"], step=steps["base"], settings=vars(s1), prompts=prompts, seed=seed
  )
  base_samples = cached_npz(
      os.path.join(outdir, "base_samples.npz"),
      base_key,
      lambda: cascade.Cascade([load("base")]).sample(
          prompts, [s1], seed=seed, batch_size=batch, progress=False
      )[0],
      counter,
  )
  refs = references(base_samples, real_u8, lowres_size, test)
  old = {}
  if os.path.exists(os.path.join(outdir, "rows.jsonl")):
    with open(os.path.join(outdir, "rows.jsonl")) as f:
      old = {(r["stage"], r["aug"], r["key"]): r for r in map(json.loads, f)}
  rows = []
  write_rows = lambda rs: write_if_changed(  # noqa: E731
      os.path.join(outdir, "rows.jsonl"), "".join(json.dumps(r) + "\n" for r in rs)
  )
  for k in (WITH, WITHOUT):
    by_level = {}
    for a in levels:
      s = dataclasses.replace(s2, aug_level=a)
      key = _key(base=base_key, sr=dirs[k], step=steps[k], settings=vars(s))
      tag = f"{k}_aug{a:g}"
      print(f"== SR stage {k.replace('_', ' ')}, sampling aug {a:g}", flush=True)
      ours = cached_npz(
          os.path.join(outdir, "samples", f"{tag}.npz"),
          key,
          lambda: run_sr(k, s, base_samples),  # noqa: B023 (called at once)
          counter,
      )
      real = cached_npz(
          os.path.join(outdir, "samples", f"{tag}_real.npz"),
          key,
          lambda: run_sr(k, s, real_lowres),  # noqa: B023 (called at once)
          counter,
      )
      by_level[a] = ours
      row = old.pop((k, a, key), None)
      if row is None:
        row = dict(score_row(k, a, ours, real, real_u8, test), step=steps[k], key=key)
        counter["rows"] += 1
        # Kept as it comes (with the earlier run's rows still ahead), for an interrupted run.
        write_rows(rows + [row] + list(old.values()))
      rows.append(row)
    sheet = grid(images.to_uint8(base_samples), by_level, real_u8, test, FLAGS.grid_rows)
    atomic.save_png(os.path.join(outdir, f"grid_{k}.png"), sheet)
    loaded.pop(k, None)  # one SR stage in memory at a time
    models.pop(k, None)

  write_rows(rows)  # this run's rows only: those of other settings go
  settings = {
      "num_prompts": len(prompts),
      "stage1": f"{s1.sampler} {s1.num_steps} steps, w={s1.guidance_weight:g}, {s1.threshold}",
      "stage2": f"{s2.sampler} {s2.num_steps} steps, w={s2.guidance_weight:g}, {s2.threshold}",
      "seed": seed,
      "workdirs": {k: dirs[k] for k in ("base", WITH, WITHOUT)},
      "steps": steps,
      "train_aug_level": {k: list(v) for k, v in aug_ranges.items()},
      "sr_stage_differences": differences,
  }
  atomic.write_text(os.path.join(outdir, "table.md"), table(rows, refs, settings))
  atomic.write_json(os.path.join(outdir, "references.json"), refs)
  plot(rows, refs, os.path.join(outdir, "aug_sweep.png"), (lowres_size, real_u8.shape[1]))
  print(table(rows, refs, settings))
  print(
      f"computed {counter['sample_sets']} sample sets and {counter['rows']} rows (the rest "
      f"reused); training {train_s:.0f} s, total {time.time() - start:.0f} s. Wrote {outdir}",
      flush=True,
  )


if __name__ == "__main__":
  define_flags()
  cli.run(main)
