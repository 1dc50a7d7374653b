"""Imagen's central claim in miniature: a frozen pretrained text encoder vs a bigger U-Net.

Imagen §2.1 / §4.4 (Fig. 4a): scaling the frozen text encoder improves image-text alignment
more than scaling the diffusion U-Net. Here, on the shapes data, the demo's base stage
(configs/base64.py:shapes, 32x32, an Efficient U-Net) is trained with each text encoder at two
U-Net widths and each of several seeds, the same step budget for all:

  encoders: byt5-tiny-random (a randomly initialised 2-layer T5 whose tokens see
            their neighbours through sharpened position biases, registry.TINY_RANDOM_BIAS_STD)
            and all-minilm-l6-v2 (a pretrained 6-layer BERT, 22M params, text.bert; `make venv`
            unpacks its weights);
  widths:   `half` (channels 64 / 96, stem 32) and `full` (the demo's 128 / 192, stem 64).

Each run's final EMA params sample the held-out shapes test prompts (DDIM, dynamic
thresholding, at each --weights value) and the exact shapes metric scores colour, shape,
position and exact match, on all prompts and on the colour+kind pairs never seen in training.
Binding (the demo's visible failure: the second object takes the first one's colour or kind)
is scored on the two-object prompts:

  binding = mean over two-object prompts of [colour and kind right for both objects]

The claim holds in miniature when the encoder change moves binding more than the width
change: with b(e, s) the binding of encoder e at width s averaged over seeds,
  encoder effect = mean_s [b(pretrained, s) - b(random, s)],
  width effect   = mean_e [b(e, full) - b(e, half)].

  python experiments/claim_encoder.py --outdir=claims/encoder [--num_steps=1500 --seeds=0,1]

Writes <outdir>/rows.jsonl (one row per run and w), table.md and binding.png; a rerun skips the
runs already scored and resumes an interrupted training (its workdir <outdir>/runs/<run>).
"""

from __future__ import annotations

import itertools
import json
import os
import time

import numpy as np
from absl import app, flags

from configs import base64 as base64_config
from imagen_jax import atomic, cli, cli_runner, images
from imagen_jax.data import shapes
from imagen_jax.evals import shapes_metric
from imagen_jax.sampling import cascade
from imagen_jax.text import registry

CONFIG = "configs/base64.py:shapes"
RANDOM, PRETRAINED = "byt5-tiny-random", "all-minilm-l6-v2"
# U-Net widths: the demo's base network (nn/presets.py) and one at half its channels.
WIDTHS = {
    "half": {"model.channels": (64, 96), "model.stem_channels": 32},
    "full": {"model.channels": (128, 192), "model.stem_channels": 64},
}
METRICS = (
    "colour",
    "shape",
    "position",
    "exact",
    "binding",
    "never_seen_colour",
    "never_seen_exact",
)

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line; defined when run as a script (tests import the module's functions,
  and several scripts' flags share names)."""
  flags.DEFINE_string("outdir", None, "where runs, rows.jsonl and table.md go", required=True)
  flags.DEFINE_list("encoders", [RANDOM, PRETRAINED], "text encoders (registry names)")
  flags.DEFINE_list("widths", list(WIDTHS), f"U-Net widths, of {list(WIDTHS)}")
  flags.DEFINE_list("seeds", ["0", "1"], "train.seed of each run")
  flags.DEFINE_integer("num_steps", 1500, "training steps of every run")
  flags.DEFINE_list("weights", ["3"], "guidance weights to sample at (1 = none)")
  flags.DEFINE_integer("num_prompts", 192, "held-out test prompts per evaluation")
  flags.DEFINE_integer("sample_steps", 25, "DDIM steps")
  flags.DEFINE_string("data_dir", None, "shapes data (default <outdir>/data)")
  flags.DEFINE_multi_string(
      "override",
      [],
      "extra config override for every run, field.path=value without commas (tiny runs, tests)",
  )


def run_name(encoder: str, width: str, seed: int) -> str:
  return f"{encoder}_{width}_seed{seed}"


def stage_config(encoder: str, extra: list[str]):
  """The shapes base config with `encoder` and the --override values (data sizes included)."""
  return base64_config.get_config(",".join(["shapes", f"text_name={encoder}", *extra]))


def check_choices(encoders, widths, seeds) -> None:
  """Clear errors for flag values the claim cannot run."""
  for w in widths:
    if w not in WIDTHS:
      raise cli.UserError(f"--widths: unknown width {w!r}; allowed: {sorted(WIDTHS)}")
  for e in encoders:
    try:
      registry.text_dim(base64_config.get_config(f"shapes,text_name={e}").text)
    except ValueError as err:  # the registry's message lists the names it knows
      raise cli.UserError(f"--encoders: {err}") from err
  if len(set(seeds)) != len(seeds) or not seeds:
    raise cli.UserError(f"--seeds must be distinct and at least one, got {seeds}")


def score(stage, test: list, w: float, sample_steps: int) -> dict:
  """Samples `test`'s prompts with one stage at guidance weight w and scores them (METRICS)."""
  settings = cascade.SamplingSettings(
      sampler="ddim", num_steps=sample_steps, guidance_weight=w, threshold="dynamic"
  )
  prompts = [e["caption"] for e in test]
  (img,) = cascade.Cascade([stage]).sample(
      prompts, [settings], seed=0, batch_size=len(prompts), progress=False
  )
  attrs = [e["attributes"] for e in test]
  r = shapes_metric.score_images(list(images.to_uint8(img)), attrs, [e["held_out"] for e in test])
  two = [p for p, a in zip(r["per_example"], attrs) if int(a["num_objects"]) == 2]
  binding = [float(p["color"] == 1.0 and p["shape"] == 1.0) for p in two]
  m = r["mean"]
  return dict(
      colour=m["color"],
      shape=m["shape"],
      position=m["position"],
      exact=m["exact"],
      binding=float(np.mean(binding)) if binding else float("nan"),
      never_seen_colour=r["held_out"]["color"],
      never_seen_exact=r["held_out"]["exact"],
      num=r["num"],
      num_two_object=len(two),
      num_never_seen=r["num_held_out"],
  )


def effects(rows: list[dict], metric: str, w: float) -> dict:
  """The encoder effect and the width effect on `metric` at w (means over seeds first); None
  where a cell of the 2 x 2 grid is missing."""
  cell = {}
  for r in rows:
    if r["w"] == w:
      cell.setdefault((r["encoder"], r["width"]), []).append(r[metric])
  mean = {k: float(np.mean(v)) for k, v in cell.items()}
  need = [(e, s) for e in (RANDOM, PRETRAINED) for s in ("half", "full")]
  if any(k not in mean for k in need):
    return {"encoder": None, "width": None}
  enc = np.mean([mean[(PRETRAINED, s)] - mean[(RANDOM, s)] for s in ("half", "full")])
  wid = np.mean([mean[(e, "full")] - mean[(e, "half")] for e in (RANDOM, PRETRAINED)])
  return {"encoder": float(enc), "width": float(wid)}


def table(rows: list[dict], num_steps: int) -> str:
  """Markdown: per (w, encoder, width) the mean over seeds and the spread (max - min) of each
  metric, then the two effects on binding and exact match."""
  lines = [
      f"{num_steps} training steps per run; mean over seeds (spread = max - min in brackets).",
      "",
      "| w | encoder | width | seeds | " + " | ".join(METRICS) + " | train s |",
      "|---" * (len(METRICS) + 5) + "|",
  ]
  keys = sorted({(r["w"], r["encoder"], r["width"]) for r in rows})
  for w, e, s in keys:
    rs = [r for r in rows if (r["w"], r["encoder"], r["width"]) == (w, e, s)]
    cells = []
    for m in METRICS:
      v = [r[m] for r in rs]
      cells.append(f"{np.mean(v):.3f} ({max(v) - min(v):.3f})")
    train_s = np.mean([r["train_s"] for r in rs])
    seeds = ",".join(str(r["seed"]) for r in rs)
    lines.append(f"| {w:g} | {e} | {s} | {seeds} | " + " | ".join(cells) + f" | {train_s:.0f} |")
  lines.append("")
  for w in sorted({r["w"] for r in rows}):
    for m in ("binding", "exact", "colour"):
      eff = effects(rows, m, w)
      if eff["encoder"] is None:
        continue
      holds = eff["encoder"] > 0 and abs(eff["encoder"]) > abs(eff["width"])
      verdict = "holds: the encoder moves it more" if holds else "does not hold here"
      lines.append(
          f"- w = {w:g}, {m}: encoder effect {eff['encoder']:+.3f}, width effect "
          f"{eff['width']:+.3f}; the claim {verdict}"
      )
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
  """binding.png: binding and exact match per (encoder, width), one dot per seed, at each w."""
  import matplotlib  # noqa: PLC0415 (the plotting backend is chosen before pyplot loads)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  ws = sorted({r["w"] for r in rows})
  fig, axes = plt.subplots(1, 2 * len(ws), figsize=(5 * 2 * len(ws), 3.6), squeeze=False)
  groups = sorted({(r["encoder"], r["width"]) for r in rows}, key=lambda k: (k[1], k[0]))
  for i, (w, metric) in enumerate(itertools.product(ws, ("binding", "exact"))):
    ax = axes[0, i]
    for x, (e, s) in enumerate(groups):
      v = [r[metric] for r in rows if (r["w"], r["encoder"], r["width"]) == (w, e, s)]
      colour = "tab:blue" if e == RANDOM else "tab:orange"
      ax.bar(x, np.mean(v), color=colour, alpha=0.5)
      ax.plot([x] * len(v), v, "k.", ms=8)
    ax.set_xticks(range(len(groups)))
    names = {RANDOM: "random", PRETRAINED: "pretrained"}
    ax.set_xticklabels([f"{names.get(e, e)}\n{s}" for e, s in groups], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"{metric} at w = {w:g}")
  fig.suptitle("random vs pretrained frozen encoder, two U-Net widths (dots: seeds)")
  fig.tight_layout()
  atomic.save_figure(path, fig, dpi=110)
  plt.close(fig)


def read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  encoders, widths = FLAGS.encoders, FLAGS.widths
  seeds = [int(s) for s in FLAGS.seeds]
  weights = [float(w) for w in FLAGS.weights]
  check_choices(encoders, widths, seeds)
  extra = list(FLAGS.override)
  outdir = os.path.abspath(FLAGS.outdir)
  os.makedirs(outdir, exist_ok=True)
  data_dir = os.path.abspath(FLAGS.data_dir or os.path.join(outdir, "data"))
  rows_path = os.path.join(outdir, "rows.jsonl")
  rows = read_rows(rows_path)
  done = {r["run"] for r in rows}

  builder = shapes.build_from_config(stage_config(encoders[0], extra).data, data_dir)
  test = shapes.read_examples(builder, "test", limit=FLAGS.num_prompts)
  caches = {}
  runs = list(itertools.product(encoders, widths, seeds))
  for i, (encoder, width, seed) in enumerate(runs):
    name = run_name(encoder, width, seed)
    if name in done:
      print(f"[{i + 1}/{len(runs)}] {name}: scored already", flush=True)
      continue
    if encoder not in caches:
      ce = stage_config(encoder, extra)
      with ce.unlocked():
        ce.data.data_dir = data_dir
      caches[encoder] = shapes.build_text_cache(ce, data_dir)
    overrides = {
        "text.name": encoder,
        "text.embedding_cache": caches[encoder],
        "data.data_dir": data_dir,
        "train.seed": seed,
        "train.num_steps": FLAGS.num_steps,
        "train.ckpt_every": FLAGS.num_steps,
        "train.max_to_keep": 1,
        **WIDTHS[width],
        **dict(o.split("=", 1) for o in extra),
    }
    print(f"\n[{i + 1}/{len(runs)}] {name}: training {FLAGS.num_steps} steps", flush=True)
    workdir = os.path.join(outdir, "runs", name)
    t0 = time.time()
    cli_runner.train_stage(CONFIG, workdir, overrides)
    train_s = round(time.time() - t0, 1)
    stage = cascade.load_stage(workdir)
    for w in weights:
      r = score(stage, test, w, FLAGS.sample_steps)
      row = dict(run=name, encoder=encoder, width=width, seed=seed, w=w, step=stage.step)
      rows.append(dict(row, **r, train_s=train_s))
      print(json.dumps(rows[-1]), flush=True)
    # A run counts as done only once every w is scored: rows are written per run, atomically.
    atomic.write_text(rows_path, "".join(json.dumps(r) + "\n" for r in rows))
  text = table(rows, FLAGS.num_steps)
  atomic.write_text(os.path.join(outdir, "table.md"), text)
  plot(rows, os.path.join(outdir, "binding.png"))
  print("\n" + text)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
