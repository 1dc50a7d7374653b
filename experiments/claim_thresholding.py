"""Paper claim 2 in miniature: static vs dynamic thresholding (Imagen §2.3, App. D, Fig. A.31).

Classifier-free guidance (§2.2) extrapolates the prediction, eps~ = w eps(z, c) + (1 - w) eps(z),
so at large w the predicted image x0_hat = (z_t - sigma_t eps~) / alpha_t leaves the data range
[-1, 1]. Sampling clips it at every step (`diffusion.guidance.threshold_x0`):

    static:  x0_hat <- clip(x0_hat, -1, 1)
    dynamic: s = max(1, percentile_p(|x0_hat|)) per image,
             x0_hat <- clip(x0_hat, -s, s) / s

(p: the cascade config's stage-1 `percentile`, 99.5 on the shapes cascade.)
The paper finds static clipping gives over-saturated, less detailed images at high w and
dynamic thresholding "significantly better photorealism as well as better image-text alignment,
especially when using very large guidance weights" (§2.3). On the default shapes data the claim
cannot show: its black background sits at the pixel bound -1, so dynamic thresholding's division
by s lifts it to grey. Here the shapes world has a background away from the bounds
(`data.shapes_background`: "grey", mid-grey = 0 in [-1, 1], the default here; or "texture",
mid-grey with a faint deterministic pattern), so no real pixel sits at a bound.

What this runs:

1. builds the shapes data with that background (its own dataset directory) and the text
   cache of its training captions; trains the demo's base stage on it
   (configs/base64.py:shapes, 32x32, --num_steps steps; the real trainer in a child process,
   `cli_runner.train_stage`, resuming <outdir>/train);
2. sweeps that stage's guidance weight over --weights (default 1, 3, 5, 8, 12) with static and
   dynamic thresholding on --num_prompts held-out test prompts, the cascade config's stage-1
   sampler otherwise (configs/cascade.py:shapes: DDIM, 25 steps), the same initial noise at every
   point (`evals.sweep.run_sweep`, resumable through <outdir>/sweep/points/);
3. scores every point:
   * alignment: the exact shapes metric (colour, shape, exact match; x axis = (colour + shape)
     / 2), its background read off each image's border (`shapes_metric.background_color`),
     so a shifted background does not count against alignment;
   * fidelity proxies, both: (a) saturation, the fraction of pixel values at the bounds
     (|x| >= 0.99; the real grey images have none, the palette spans [30, 240] / 255), which
     measures the failure §2.3 names, static clipping piling pixels at +-1, with no learned
     model; (b) the Frechet distance to the real test images on fixed random-conv features
     (`evals.features.RandomConvFeatures`, labelled "not FID"): no Inception weights here, and
     a feature extractor trained on the shapes data would be one more model to train and
     validate; random-conv statistics do respond to the global colour / contrast shifts that
     thresholding causes.

Writes into --outdir: table.md (one row per w: alignment, exact, saturation and FD, static vs
dynamic, and the real images' saturation), rows.jsonl (every metric of every point),
claim_thresholding.png (alignment, saturation and FD against w, one line per mode), and from
`evals.sweep_report` sweep/results.csv, sweep/results.md, sweep/pareto.png (alignment vs FD, the
layout of Fig. A.8) and sweep/samples.png (--grid_prompts prompts x every (mode, w)). Interrupt
and rerun freely: training resumes, finished points are read back.

  python experiments/claim_thresholding.py --outdir=claims_out/thresholding

Smaller runs: --num_steps, --num_prompts, --weights; the stage config takes `--config.*`
overrides and the sampling settings `--cascade.*` (a tiny run: tests/test_claim_thresholding.py).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from imagen_jax import atomic, cli, cli_runner
from imagen_jax.data import shapes
from imagen_jax.evals import prompts as prompts_lib
from imagen_jax.evals import sweep, sweep_report
from imagen_jax.sampling import cascade, hosts

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line; defined when run as a script (tests import the module's functions,
  and several scripts' flags share names)."""
  config_flags.DEFINE_config_file(
      "config", "configs/base64.py:shapes", "base stage config; --config.a.b=v overrides"
  )
  config_flags.DEFINE_config_file(
      "cascade", "configs/cascade.py:shapes", "sampling settings of stage 1 (sampler, steps)"
  )
  flags.DEFINE_string("outdir", None, "where train/, sweep/ and the table go", required=True)
  flags.DEFINE_string("background", "grey", f"shapes background, one of {shapes.BACKGROUNDS}")
  flags.DEFINE_string("data_dir", "", "shapes dataset and text cache; '' = <outdir>/data")
  flags.DEFINE_integer("num_steps", 2500, "base stage training steps (the demo's)")
  flags.DEFINE_list("weights", ["1", "3", "5", "8", "12"], "guidance weights w >= 1")
  flags.DEFINE_integer("num_prompts", 192, "held-out test prompts per point (the demo's)")
  flags.DEFINE_integer("seed", 0, "sampling seed (prompt i draws the same noise per point)")
  flags.DEFINE_integer("batch_size", None, "sampling batch; default: the cascade config's")
  flags.DEFINE_integer("grid_prompts", 4, "prompts shown in sweep/samples.png")


MODES = ("static", "dynamic")
# (row field, table header, lower is better?) of the claim table, per mode.
COLUMNS = (
    ("alignment_color_shape", "align", False),
    ("shapes_exact", "exact", False),
    ("saturation_final", "sat.", True),
    ("fd", "FD", True),
)


def claim_rows(rows) -> list[dict]:
  """The sweep's rows reduced to the claim's fields, ordered by (w, mode); JSON-serialisable."""
  keep = (
      "weight",
      "threshold",
      "alignment_color_shape",
      "shapes_color",
      "shapes_shape",
      "shapes_exact",
      "saturation_final",
      "saturation_upper_final",
      "fd",
      "num_samples",
      "key",
  )
  out = [{k: r[k] for k in keep if k in r} for r in rows]
  return sorted(out, key=lambda r: (r["weight"], MODES.index(r["threshold"])))


def claim_table(rows, *, background: str, reference_saturation: float | None, note: str) -> str:
  """Markdown: one row per w, each metric static | dynamic, and the dynamic - static gap in
  alignment; then what the columns mean."""
  by = {(r["weight"], r["threshold"]): r for r in rows}
  weights = sorted({r["weight"] for r in rows})
  head = ["w"] + [f"{name} {m}" for _, name, _ in COLUMNS for m in MODES] + ["align dyn - stat"]
  lines = [
      f"Static vs dynamic thresholding (Imagen §2.3), shapes on a {background} background.",
      "",
      "| " + " | ".join(head) + " |",
      "|" + "---|" * len(head),
  ]
  for w in weights:
    cells = [f"{w:g}"]
    for field, _, _ in COLUMNS:
      for m in MODES:
        v = by.get((w, m), {}).get(field)
        cells.append("" if v is None else f"{v:.4g}")
    s, d = by.get((w, "static")), by.get((w, "dynamic"))
    gap = (
        f"{d['alignment_color_shape'] - s['alignment_color_shape']:+.4f}"
        if s and d and "alignment_color_shape" in s and "alignment_color_shape" in d
        else ""
    )
    lines.append("| " + " | ".join(cells + [gap]) + " |")
  ref = "" if reference_saturation is None else f" (real test images: {reference_saturation:.4g})"
  lines += [
      "",
      "align: shapes metric (colour + shape) / 2, background read off each image's border; "
      "exact: every attribute of the caption right. sat.: fraction of pixel values with "
      f"|x| >= {sweep.SATURATION_LEVEL} in [-1, 1]{ref}. FD: Frechet distance to the real "
      "test images on random-conv features (not FID). Lower sat. / FD = closer to the data.",
      note,
  ]
  return "\n".join(lines) + "\n"


def plot(rows, path: str, title: str) -> None:
  """Alignment, saturation and FD against w, one line per thresholding mode."""
  import matplotlib  # deferred: a 1 s import that only the plot needs

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after use("Agg"): no display needed

  fields = [(f, n) for f, n, _ in COLUMNS if any(f in r for r in rows)]
  fig, axes = plt.subplots(1, len(fields), figsize=(4.0 * len(fields), 3.6))
  for ax, (field, name) in zip(np.atleast_1d(axes), fields):
    for m in MODES:
      pts = sorted(
          (r for r in rows if r["threshold"] == m and field in r), key=lambda r: r["weight"]
      )
      ax.plot([r["weight"] for r in pts], [r[field] for r in pts], "o-", label=m)
    ax.set_xlabel("guidance weight w")
    ax.set_title(name)
    ax.grid(alpha=0.3)
  np.atleast_1d(axes)[0].legend(title="thresholding")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  atomic.save_figure(path, fig, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    background = shapes.check_background(FLAGS.background)
    weights = [float(w) for w in FLAGS.weights]
  except ValueError as e:
    raise cli.UserError(f"--background / --weights: {e}") from None
  c = FLAGS.config
  config_flag = flags.FLAGS["config"]
  user = config_flags.get_override_values(config_flag)
  outdir = os.path.abspath(FLAGS.outdir)
  os.makedirs(outdir, exist_ok=True)
  data_dir = os.path.abspath(FLAGS.data_dir or os.path.join(outdir, "data"))

  # 1. data with the background, text cache, training (resumed)
  d = c.data
  with c.unlocked():
    c.data.data_dir = data_dir
    c.data.shapes_background = background
  shapes.build_from_config(c.data, data_dir)
  overrides = {
      **user,
      "data.data_dir": data_dir,
      "data.shapes_background": background,
      "train.num_steps": FLAGS.num_steps,
  }
  if not c.text.embedding_cache:  # the frozen encoder (§2.1): each caption encoded once
    overrides["text.embedding_cache"] = shapes.build_text_cache(c, data_dir)
  workdir = os.path.join(outdir, "train")
  cli_runner.train_stage(config_flags.get_config_filename(config_flag), workdir, overrides)

  # 2. the sweep: w x {static, dynamic} on the held-out test prompts
  model = cascade.Cascade.from_workdirs([workdir])
  try:
    batch = hosts.application_batch_size(model, FLAGS.batch_size, FLAGS.cascade)
    base, stage, points = sweep.plan(
        model, FLAGS.cascade, sweep_stage=1, weights=weights, thresholds=MODES
    )
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  prompts, attributes, reference = prompts_lib.shapes_test_prompts(
      data_dir,
      int(model.stages[0].image_size),
      num_train=int(d.num_train),
      num_test=int(d.num_test),
      seed=int(d.shapes_seed),
      limit=FLAGS.num_prompts,
      background=background,
  )
  sweep_dir = os.path.join(outdir, "sweep")
  result = sweep.run_sweep(
      model,
      prompts,
      base,
      points,
      sweep_dir,
      sweep_stage=stage,
      attributes=attributes,
      reference_images=reference,
      seed=FLAGS.seed,
      batch_size=batch,
      metric_background="border",
  )

  # 3. outputs
  s1 = base[0]
  title = (
      f"base stage {model.stages[0].image_size}px, step {model.stages[0].step}, {background} "
      f"background, {len(prompts)} prompts, {s1.sampler} {s1.num_steps} steps, "
      f"dynamic p={s1.percentile:g}"
  )
  sweep_report.write_outputs(result, sweep_dir, title, grid_prompts=FLAGS.grid_prompts)
  rows = claim_rows(result.rows)
  atomic.write_text(os.path.join(outdir, "rows.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
  table = claim_table(
      rows,
      background=background,
      reference_saturation=result.reference_saturation,
      note=f"Setting: {title}; overrides: {sorted(f'{k}={v}' for k, v in user.items())}.",
  )
  atomic.write_text(os.path.join(outdir, "table.md"), table)
  plot(rows, os.path.join(outdir, "claim_thresholding.png"), title)
  print(table)
  print(f"{result.computed} points sampled, {result.cached} read back; outputs in {outdir}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
