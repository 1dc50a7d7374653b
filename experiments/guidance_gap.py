"""How much classifier-free guidance (Imagen §2.2) adds over w = 1, as the base stage trains.

Trains a base stage (configs/base64.py:shapes, or any config and `--config.*` overrides) with
the real trainer, `python -m imagen_jax.train` in a child process, keeping a checkpoint at every
--eval_steps step. Then, for each eval step, loads that checkpoint's EMA params
(`cascade.load_stage(workdir, step=s)`), samples the shapes test prompts through
`cascade.Cascade` at every --weights value (DDIM, dynamic thresholding, as the demo's stage 1)
and scores them with the exact shapes metric. Stage 1 only: the demo's SR stage keeps stage 1's
colour and shape.

  python experiments/guidance_gap.py --outdir=gap/x0 --eval_steps=1500,2000,2500 \
      --weights=1,2,3,5 --config.data.data_dir=demo_out/data \
      [--config.diffusion.target=eps --config.train.global_batch_size=64 ...]

Writes <outdir>/rows.jsonl (one row per (step, w): colour, shape, exact, colour / shape on the
never-seen colour+kind pairs, and the training wall time train_s) and <outdir>/table.md, and prints the table; the stage's
workdir is <outdir>/train (rerunning resumes it). --deadline_s stops training early (the
trainer saves the step reached), and that step is evaluated too.
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import app, flags
from ml_collections import config_flags

from imagen_jax import atomic, cli, cli_runner, images
from imagen_jax.data import shapes
from imagen_jax.evals import shapes_metric
from imagen_jax.sampling import cascade

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line; defined when run as a script (tests import the module's functions,
  and several scripts' flags share names)."""
  config_flags.DEFINE_config_file(
      "config", "configs/base64.py:shapes", "base stage config; --config.a.b=v overrides"
  )
  flags.DEFINE_string("outdir", None, "where rows.jsonl and table.md go", required=True)
  flags.DEFINE_list("eval_steps", ["1500", "2000", "2500"], "steps to evaluate at")
  flags.DEFINE_list("weights", ["1", "3"], "guidance weights (1 = no guidance)")
  flags.DEFINE_integer("num_prompts", 192, "test prompts per evaluation")
  flags.DEFINE_integer("sample_steps", 25, "DDIM steps")
  flags.DEFINE_bool("text_cache", True, "encode the training captions once (text.embedding_cache)")
  flags.DEFINE_float(
      "deadline_s",
      0.0,
      "stop training after this many seconds (0 = never), evaluate the step reached",
  )


def checkpoint_plan(eval_steps, num_steps: int) -> dict:
  """Trainer overrides that keep a checkpoint at every eval step: `ckpt_every` = the gcd of the
  steps, `max_to_keep` = every checkpoint of the run."""
  steps = sorted({int(s) for s in eval_steps})
  if not steps or steps[0] < 1 or steps[-1] > num_steps:
    raise ValueError(
        f"eval steps {list(eval_steps)} must lie in [1, train.num_steps={num_steps}] "
        "(step 0 has no checkpoint)"
    )
  every = math.gcd(*steps)
  return {
      "train.num_steps": int(num_steps),
      "train.ckpt_every": every,
      "train.max_to_keep": num_steps // every + 1,
  }


def evaluate(stage, test: list, weights, sample_steps: int) -> list[dict]:
  """One row per guidance weight: the shapes metric of a loaded stage's samples."""
  model = cascade.Cascade([stage])
  prompts = [e["caption"] for e in test]
  rows = []
  for w in weights:
    settings = cascade.SamplingSettings(
        sampler="ddim", num_steps=sample_steps, guidance_weight=w, threshold="dynamic"
    )
    (img,) = model.sample(prompts, [settings], seed=0, batch_size=len(prompts), progress=False)
    r = shapes_metric.score_images(
        list(images.to_uint8(img)), [e["attributes"] for e in test], [e["held_out"] for e in test]
    )
    rows.append(
        dict(
            step=stage.step,
            w=w,
            colour=r["mean"]["color"],
            shape=r["mean"]["shape"],
            exact=r["mean"]["exact"],
            held_colour=r["held_out"]["color"],
            held_shape=r["held_out"]["shape"],
            n=len(prompts),
        )
    )
    print(json.dumps(rows[-1]), flush=True)
  return rows


def gap_table(rows, weights, overrides=()) -> str:
  """Markdown: one line per step, colour (held-out colour) per w, and the gain over w = 1."""
  head = " | ".join(f"w={w:g} colour (never-seen)" for w in weights)
  lines = [
      f"settings: {' '.join(overrides) or 'the config as is'}",
      "",
      f"| step | {head} | best gain over w=1 |",
      "|---" * (len(weights) + 2) + "|",
  ]
  for step in sorted({r["step"] for r in rows}):
    by_w = {r["w"]: r for r in rows if r["step"] == step}
    cells = " | ".join(
        f"{by_w[w]['colour']:.3f} ({by_w[w]['held_colour']:.3f})" if w in by_w else "-"
        for w in weights
    )
    gain = (
        max(r["colour"] for r in by_w.values()) - by_w[1.0]["colour"]
        if 1.0 in by_w
        else float("nan")
    )
    lines.append(f"| {step} | {cells} | {gain:+.3f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  c = FLAGS.config
  config_flag = flags.FLAGS["config"]
  user = config_flags.get_override_values(config_flag)
  weights = [float(w) for w in FLAGS.weights]
  plan = checkpoint_plan(FLAGS.eval_steps, int(c.train.num_steps))
  outdir = os.path.abspath(FLAGS.outdir)
  workdir = os.path.join(outdir, "train")
  os.makedirs(outdir, exist_ok=True)

  d = c.data
  data_dir = d.data_dir or os.path.join(outdir, "data")
  builder = shapes.build_from_config(d, data_dir)
  overrides = {**user, **plan, "data.data_dir": data_dir}
  if FLAGS.text_cache and not c.text.embedding_cache:
    with c.unlocked():
      c.data.data_dir = data_dir
    overrides["text.embedding_cache"] = shapes.build_text_cache(c, data_dir)

  t0 = time.time()
  finished = cli_runner.train_stage(
      config_flags.get_config_filename(config_flag),
      workdir,
      overrides,
      deadline_s=FLAGS.deadline_s or None,
  )
  train_s = round(time.time() - t0, 1)  # this call's training time (0 + startup when resumed)
  steps = sorted({int(s) for s in FLAGS.eval_steps})
  if not finished:  # stopped by the deadline: the eval steps reached, then the step reached
    reached = cascade.load_stage(workdir).step
    steps = [s for s in steps if s < reached] + [reached]

  test = shapes.read_examples(builder, "test", limit=FLAGS.num_prompts)
  rows = []
  for step in steps:
    stage = cascade.load_stage(workdir, step=step)  # that checkpoint's EMA params
    rows += [dict(r, train_s=train_s) for r in evaluate(stage, test, weights, FLAGS.sample_steps)]
    atomic.write_text(
        os.path.join(outdir, "rows.jsonl"), "".join(json.dumps(r) + "\n" for r in rows)
    )
  table = gap_table(rows, weights, overrides=[f"{k}={v}" for k, v in user.items()])
  atomic.write_text(os.path.join(outdir, "table.md"), table)
  print(table)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
