r"""Imagen's claim 4 in miniature: the Efficient U-Net (§2.5, App. B.1) against the plain U-Net
block at a similar parameter count. The paper reports that the Efficient U-Net is simpler, more
memory efficient, converges faster and runs 2-3x more steps per second than the standard U-Net
(§2.5, App. B.1, D.3.2).

  python experiments/claim_efficient_unet.py --outdir=claims/efficient [--budget_s=900]

The networks are trained as the demo's base stage (configs/base64.py:shapes: the shapes data
at 32x32, its text-embedding cache, Adam, x0-prediction, batch 16) through the trainer's command
line (`imagen_jax.cli_runner.train_stage`, a child process) for the SAME wall-time budget
(--budget_s per network: the trainer gets SIGTERM then and saves the step reached):

* `efficient_unet`: `--efficient` (default `shapes`, the demo's network, 8.1M params);
* `unet`: `--unet` (default `shapes,model=shapes_unet`: App. F.1's block sized to 7.8M params,
  `imagen_jax.nn.presets` says how), i.e. `--config=configs/base64.py:shapes,model=shapes_unet`
  for the trainer, which then takes `--config.model.*` flags like any config;
* `efficient_paper`: `--efficient_paper` (default
  `shapes,model.space_to_depth=1`): the demo's Efficient U-Net without the pixel-unshuffle by 2
  that it adds to App. B.1 (our extension, `nn.unet.EfficientUNet`): the same parameters, the
  network at full resolution. It separates what App. B.1's design gives from what the
  unshuffle gives.

`--common` (e.g. `batch=32,data.num_train=2000`) is appended to every config argument. The
learning-rate schedule decays over `train.num_steps` = --max_steps, far beyond what any run
reaches, so all train at an (almost) constant rate and no run's schedule depends on its speed.

Before training, benchmarks/efficient_vs_unet.py measures each network's training step in its
own child process (params, model FLOPs, median steps/s, XLA's temporary memory, peak RSS).

Then each run's `metrics.jsonl` (one row per `train.log_every` steps: the mean loss of those
steps and the steps/s since the previous row) gives the loss against wall-clock seconds of the
training loop (sum of the rows' intervals; the first includes the step's compile, a trainer
restart's start-up is not counted). The logged loss is noisy (per-batch t and eps), so every
loss reported is smoothed: the mean of the rows logged in the last --window_s seconds before
the time it is read at. "Loss at equal wall time" is read at T = the shortest of the runs'
loop times (all trained at least that long).

At the end each network's final EMA params sample --eval_prompts shapes test prompts
(experiments/guidance_sweep.py at one point: DDIM, w = --eval_w, dynamic thresholding, a child
process), scored with the exact shapes metric (colour, shape, exact match): how far each got in
the same wall time.

Writes into --outdir: rows.jsonl (one row per network), table.md, loss_vs_time.png, and per
network `<name>/bench.json` (the benchmark), `<name>/train` (the trainer's workdir), `done.json`
and `<name>/eval` (the scored samples: results.md, samples.png; scores.json, which a rerun reuses).
Resumable: a run whose done.json records a budget >= --budget_s is not trained again (written
atomically once the trainer exits at its budget); an interrupted run resumes from its last
checkpoint for the rest of its budget (the budget minus the loop time already logged). So a
network can join a finished comparison: the same command with one more name in --networks
benchmarks, trains and scores only that network, then tabulates them all. The three networks
at the default 900 s each: about 50 minutes on an idle 2-core CPU.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
from absl import flags

from configs import base64 as base64_config
from imagen_jax import atomic, cli, cli_runner
from imagen_jax.data import shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARK = os.path.join(REPO, "benchmarks", "efficient_vs_unet.py")
SWEEP = os.path.join(REPO, "experiments", "guidance_sweep.py")

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line; defined when run as a script (tests import the module's functions,
  and several scripts' flags share names)."""
  flags.DEFINE_string("outdir", None, "where the results go", required=True)
  flags.DEFINE_float("budget_s", 900.0, "training wall-time budget of each network (s)")
  flags.DEFINE_string(
      "efficient", "shapes", "configs/base64.py argument of the Efficient U-Net run"
  )
  flags.DEFINE_string(
      "unet", "shapes,model=shapes_unet", "configs/base64.py argument of the plain U-Net run"
  )
  flags.DEFINE_string(
      "efficient_paper",
      "shapes,model.space_to_depth=1",
      "configs/base64.py argument of the Efficient U-Net without our pixel-unshuffle",
  )
  flags.DEFINE_list(
      "networks",
      ["efficient_unet", "unet", "efficient_paper"],
      "two or three of efficient_unet, unet, efficient_paper",
  )
  flags.DEFINE_string("common", "", "key=value,... appended to every config argument")
  flags.DEFINE_integer(
      "max_steps", 100_000, "train.num_steps (the schedule's length; runs stop at the budget)"
  )
  flags.DEFINE_string(
      "data_dir", "", "the shapes dataset and text cache (default <outdir>/data; the demo's works)"
  )
  flags.DEFINE_integer("bench_steps", 20, "timed benchmark steps (0: no benchmark)")
  flags.DEFINE_float("window_s", 120.0, "the loss smoothing window (s of training)")
  flags.DEFINE_integer(
      "eval_prompts", 64, "shapes test prompts sampled and scored per network (0: no scoring)"
  )
  flags.DEFINE_float("eval_w", 3.0, "the guidance weight of the scored samples")
  flags.DEFINE_integer(
      "eval_sample_steps", 0, "DDIM steps of the scored samples (0: configs/cascade.py:shapes')"
  )


# Names in the outputs -> (the flag that holds the network's config argument, its model kind).
NETWORKS = {
    "efficient_unet": ("efficient", "efficient_unet"),
    "unet": ("unet", "unet"),
    "efficient_paper": ("efficient_paper", "efficient_unet"),
}
MIB = 2**20


def config_arg(name: str) -> str:
  """The full configs/base64.py argument of a network: its flag, then --common."""
  arg, common = FLAGS[NETWORKS[name][0]].value, FLAGS.common.strip(", ")
  return f"{arg},{common}" if common else arg


def build_config(name: str):
  """The network's stage config; a bad argument or a wrong kind is a `cli.UserError`."""
  flag_name, kind = NETWORKS[name]
  flag = FLAGS[flag_name]
  try:
    c = base64_config.get_config(config_arg(name))
  except ValueError as e:
    raise cli.UserError(f"--{flag.name}: {e}") from None
  if c.model.kind != kind:
    raise cli.UserError(
        f"--{flag.name}={flag.value} builds a {c.model.kind}; the {name} run needs kind {kind} "
        "(the plain U-Net: --unet=shapes,model=shapes_unet)"
    )
  return c


def read_curve(workdir: str) -> dict:
  """The logged training curve of a trainer workdir: step, wall seconds of the training loop
  at each logged row (cumulative sum of (step - previous step) / steps_per_sec), the logged
  (mean-over-the-interval) loss and steps/s. Empty arrays before the first row."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  rows = [r for r in rows if "loss" in r and "steps_per_sec" in r]
  step = np.array([int(r["step"]) for r in rows], dtype=np.int64)
  sps = np.array([float(r["steps_per_sec"]) for r in rows])
  loss = np.array([float(r["loss"]) for r in rows])
  dt = np.diff(step, prepend=0) / np.maximum(sps, 1e-12)
  return dict(step=step, wall_s=np.cumsum(dt), loss=loss, steps_per_sec=sps)


def smoothed_loss(curve: dict, t: float, window_s: float) -> float:
  """Mean logged loss of the rows at wall seconds in (t - window_s, t] (at least the last row
  at or before t); NaN before the first row."""
  wall, loss = curve["wall_s"], curve["loss"]
  upto = wall <= t + 1e-9
  if not upto.any():
    return float("nan")
  keep = upto & (wall > t - window_s)
  keep[np.flatnonzero(upto)[-1]] = True
  return float(loss[keep].mean())


def train(name: str, overrides: dict, outdir: str, budget_s: float) -> dict:
  """Trains (or resumes) one network for its wall-time budget; returns its done.json record.

  A run whose done.json holds a budget >= budget_s (or that reached train.num_steps) is not
  trained again.
  """
  workdir = os.path.join(outdir, name, "train")
  done_path = os.path.join(outdir, name, "done.json")
  if os.path.exists(done_path):
    with open(done_path) as f:
      done = json.load(f)
    if done["reached_num_steps"] or done["budget_s"] >= budget_s:
      print(f"== {name}: done ({done['step']} steps), not trained again", flush=True)
      return done
  used = float(read_curve(workdir)["wall_s"][-1:].sum())  # loop time of an earlier attempt
  left = budget_s - used
  reached = False
  if left > 0:
    print(f"== training {name} for {left:.0f} s -> {workdir}", flush=True)
    reached = cli_runner.train_stage(
        f"{base64_config.__file__}:{config_arg(name)}", workdir, overrides, deadline_s=left
    )
  curve = read_curve(workdir)
  done = dict(
      budget_s=budget_s,
      reached_num_steps=bool(reached),
      step=int(curve["step"][-1]) if len(curve["step"]) else 0,
      loop_s=float(curve["wall_s"][-1]) if len(curve["wall_s"]) else 0.0,
  )
  atomic.write_json(done_path, done)  # the completion record: written once training ended
  return done


def benchmark(name: str, outdir: str, steps: int) -> dict:
  """benchmarks/efficient_vs_unet.py on one network in its own process (`<name>/bench.json`,
  reused when there): its row, or {} with steps = 0."""
  if steps <= 0:
    return {}
  path = os.path.join(outdir, name, "bench.json")
  if not os.path.exists(path):
    print(f"== benchmark of {name}'s training step", flush=True)
    command = [sys.executable, BENCHMARK, f"--steps={steps}", f"--json_out={path}"]
    subprocess.run([*command, f"--arg={config_arg(name)}"], check=True, cwd=REPO)
  with open(path) as f:
    return json.load(f)[0]


def evaluate(name: str, outdir: str, data_dir: str, step: int) -> dict:
  """The shapes metric of the network's final EMA params (checkpoint `step`):
  experiments/guidance_sweep.py (a child process) at one point, w = --eval_w with dynamic
  thresholding on --eval_prompts test prompts; {} when turned off. The scores are kept in
  `<name>/eval/scores.json` with what they were computed from, and reused while that matches."""
  n = FLAGS.eval_prompts
  if n <= 0:
    return {}
  out = os.path.join(outdir, name, "eval")
  key = dict(step=step, eval_n=n, eval_w=FLAGS.eval_w, eval_sample_steps=FLAGS.eval_sample_steps)
  path = os.path.join(out, "scores.json")
  if os.path.exists(path):
    with open(path) as f:
      kept = json.load(f)
    if kept["key"] == key:
      return kept["scores"]
  print(f"== scoring {name}'s samples ({n} test prompts, w = {FLAGS.eval_w:g})", flush=True)
  command = [
      sys.executable,
      SWEEP,
      f"--workdirs={os.path.join(outdir, name, 'train')}",
      f"--weights={FLAGS.eval_w}",
      "--thresholds=dynamic",
      f"--num_prompts={n}",
      f"--batch_size={n}",
      f"--data_dir={data_dir}",
      f"--outdir={out}",
  ]
  if FLAGS.eval_sample_steps:
    command.append(f"--config.stage1.num_steps={FLAGS.eval_sample_steps}")
  subprocess.run(command, check=True, cwd=REPO)  # its default --config path is relative
  with open(os.path.join(out, "results.csv"), newline="") as f:
    (row,) = list(csv.DictReader(f))
  names = ("shapes_color", "shapes_shape", "shapes_exact", "fd")
  scores = {k: float(row[k]) for k in names if row.get(k)} | {"eval_w": FLAGS.eval_w, "eval_n": n}
  atomic.write_json(path, {"key": key, "scores": scores})
  return scores


def _finite(x: float) -> float | None:
  """None for NaN (no row logged by then): rows.jsonl stays valid JSON."""
  return None if x != x else x


def result_rows(
    curves: dict, done: dict, bench: dict, config_args: dict, window_s: float, scores=None
) -> list[dict]:
  """One row per network (the keys of `curves`): the benchmark's figures, the run's steps,
  steps/s (median logged, the first row with its compile left out), the smoothed final loss and
  the smoothed loss at T = the shorter run's loop time; `scores[name]`: `evaluate`'s."""
  t_equal = min(float(c["wall_s"][-1]) if len(c["wall_s"]) else 0.0 for c in curves.values())
  rows = []
  for name, curve in curves.items():
    b = bench.get(name, {})
    sps = curve["steps_per_sec"][1:] if len(curve["steps_per_sec"]) > 1 else curve["steps_per_sec"]
    end = float(curve["wall_s"][-1]) if len(curve["wall_s"]) else 0.0
    rows.append(
        dict(
            network=name,
            config=config_args[name],
            params=b.get("params"),
            model_gflop_per_step=b.get("model_gflop"),
            bench_steps_per_s=b.get("steps_per_s"),
            temp_mib=None if "temp_bytes" not in b else b["temp_bytes"] / MIB,
            peak_rss_mib=None if "peak_rss_bytes" not in b else b["peak_rss_bytes"] / MIB,
            compile_s=b.get("compile_s"),
            train_steps_per_s=float(np.median(sps)) if len(sps) else None,
            steps=done[name]["step"],
            loop_s=end,
            final_loss=_finite(smoothed_loss(curve, end, window_s)),
            equal_time_s=t_equal,
            loss_at_equal_time=_finite(smoothed_loss(curve, t_equal, window_s)),
            window_s=window_s,
            budget_s=done[name]["budget_s"],
            **(scores or {}).get(name, {}),
        )
    )
  return rows


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
  """Markdown: network | params | GFLOP/step | steps/s | memory | compile | steps | losses |
  shapes metric, then the config argument of each network."""
  t, w = rows[0]["equal_time_s"], rows[0]["window_s"]
  lines = [
      f"budget {rows[0]['budget_s']:g} s of training per network; wall time: the training "
      f"loop's (its first step's compile included); losses: the mean logged loss over the last "
      f"{w:g} s of training (the logged loss is per-batch noisy)",
      "",
      "| network | params | GFLOP/step | steps/s (benchmark / training) | temp memory MiB "
      f"| peak RSS MiB | compile s | steps reached | final loss | loss at {t:.0f} s "
      f"| colour / shape / exact at the end (w = {rows[0].get('eval_w', '-')}) |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    params = "-" if r["params"] is None else f"{r['params'] / 1e6:.2f}M"
    lines.append(
        f"| {r['network']} | {params} | {_fmt(r['model_gflop_per_step'], '.1f')} | "
        f"{_fmt(r['bench_steps_per_s'], '.2f')} / {_fmt(r['train_steps_per_s'], '.2f')} | "
        f"{_fmt(r['temp_mib'], '.0f')} | {_fmt(r['peak_rss_mib'], '.0f')} | "
        f"{_fmt(r['compile_s'], '.0f')} | {r['steps']} | {_fmt(r['final_loss'], '.4f')} | "
        f"{_fmt(r['loss_at_equal_time'], '.4f')} | "
        + " / ".join(_fmt(r.get(f"shapes_{a}"), ".3f") for a in ("color", "shape", "exact"))
        + " |"
    )
  lines += ["", *(f"- {r['network']}: `configs/base64.py:{r['config']}`" for r in rows)]
  return "\n".join(lines) + "\n"


def plot(curves: dict, rows: list[dict], path: str, window_s: float) -> None:
  """Training loss (logged: faint; smoothed over window_s: solid) vs wall-clock seconds."""
  import matplotlib  # deferred: a 1 s import that only the plot needs

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after use("Agg"): no display needed

  fig, ax = plt.subplots(figsize=(7, 4.2))
  for (name, curve), colour in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green")):
    wall = curve["wall_s"]
    ax.plot(wall, curve["loss"], color=colour, alpha=0.25, lw=0.8)
    smooth = [smoothed_loss(curve, t, window_s) for t in wall]
    ax.plot(wall, smooth, color=colour, lw=2, label=f"{name} (mean over {window_s:g} s)")
  ax.axvline(rows[0]["equal_time_s"], color="grey", ls="--", lw=1, label="equal wall time")
  ax.set_xlabel("training wall-clock seconds")
  ax.set_yscale("log")  # the losses differ by ~1.5x late, against 30x over the first minutes
  ax.set_ylabel("training loss (log scale)")
  ax.set_title("Efficient U-Net vs U-Net at similar parameters (shapes base, 32x32)")
  ax.legend()
  fig.tight_layout()
  atomic.save_figure(path, fig, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.budget_s > 0:
    raise cli.UserError(f"--budget_s={FLAGS.budget_s}: allowed: a number of seconds > 0")
  bad = [f"--window_s={FLAGS.window_s}: allowed: > 0"] if FLAGS.window_s <= 0 else []
  bad += [f"--max_steps={FLAGS.max_steps}: allowed: >= 1"] if FLAGS.max_steps < 1 else []
  for f in (FLAGS[n] for n in ("bench_steps", "eval_prompts", "eval_sample_steps")):
    bad += [f"--{f.name}={f.value}: allowed: >= 0"] if f.value < 0 else []
  if bad:
    raise cli.UserError("; ".join(bad))
  names = list(FLAGS.networks)
  if len(set(names)) != len(names) or len(names) < 2 or not set(names) <= set(NETWORKS):
    raise cli.UserError(
        f"--networks={','.join(names)}: allowed: two or three different of {', '.join(NETWORKS)}"
    )
  configs = {name: build_config(name) for name in names}
  c = configs[names[0]]
  for section in ("data", "text"):
    if any(configs[n][section].to_dict() != c[section].to_dict() for n in names):
      raise cli.UserError(f"the networks' config arguments set different {section}: use --common")
  outdir = os.path.abspath(FLAGS.outdir)
  os.makedirs(outdir, exist_ok=True)
  data_dir = os.path.abspath(FLAGS.data_dir or os.path.join(outdir, "data"))
  shapes.build_from_config(c.data, data_dir)
  overrides = {
      "data.data_dir": data_dir,
      "text.embedding_cache": c.text.embedding_cache or shapes.build_text_cache(c, data_dir),
      "train.num_steps": FLAGS.max_steps,
      "train.progress_bar": False,
  }
  bench = {name: benchmark(name, outdir, FLAGS.bench_steps) for name in names}
  done = {name: train(name, overrides, outdir, FLAGS.budget_s) for name in names}
  curves = {name: read_curve(os.path.join(outdir, name, "train")) for name in names}
  args = {name: config_arg(name) for name in names}
  scores = {name: evaluate(name, outdir, data_dir, done[name]["step"]) for name in names}
  rows = result_rows(curves, done, bench, args, FLAGS.window_s, scores)
  atomic.write_text(os.path.join(outdir, "rows.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
  text = table(rows)
  atomic.write_text(os.path.join(outdir, "table.md"), text)
  plot(curves, rows, os.path.join(outdir, "loss_vs_time.png"), FLAGS.window_s)
  print(text)
  print(f"wrote {outdir}/rows.jsonl, table.md, loss_vs_time.png")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
