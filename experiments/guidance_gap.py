"""How much classifier-free guidance adds over w = 1, as the base stage trains (issue 7).

Trains the demo's base stage (configs/base64.py:shapes, or any variant and overrides) with the
real train step, optimizer, EMA and frozen text encoder, from the shapes train split held in
memory (no grain pipeline: on a GPU the step is fast enough that the host pipeline would
dominate), and at each of --eval_steps samples the shapes test prompts through
`cascade.Cascade` at every --weights value (DDIM 25 steps, dynamic thresholding, as the demo's
stage 1) and scores them with the exact shapes metric. Stage 1 only: the demo's SR stage keeps
stage 1's colour and shape (issue 7's report).

  python experiments/guidance_gap.py --data_dir=demo_out/data --outdir=gap/x0 \
      --steps=2500 --eval_steps=1500,2000,2500 --weights=1,2,3,5 \
      [--set=diffusion.target=eps --set=train.global_batch_size=64 ...]

Writes <outdir>/rows.jsonl (one row per (step, w): colour, shape, exact, and colour / shape on
the never-seen colour+kind pairs) and <outdir>/table.md, and prints the table. --deadline_s
stops training early, with one last evaluation at the step reached.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "shapes data dir (built if missing)", required=True
)
_OUTDIR = flags.DEFINE_string("outdir", None, "where rows.jsonl and table.md go", required=True)
_VARIANT = flags.DEFINE_string("variant", "shapes", "configs/base64.py variant")
_STEPS = flags.DEFINE_integer("steps", 2500, "training steps")
_EVAL_STEPS = flags.DEFINE_list("eval_steps", ["1500", "2000", "2500"], "steps to evaluate at")
_WEIGHTS = flags.DEFINE_list("weights", ["1", "3"], "guidance weights (1 = no guidance)")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 192, "test prompts per evaluation")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 25, "DDIM steps")
_SET = flags.DEFINE_multi_string("set", [], "config override key=value (python literal)")
_DEADLINE = flags.DEFINE_float(
    "deadline_s",
    0.0,
    "stop training after this many seconds " "(0 = never) and evaluate the step reached",
)


def apply_overrides(config, overrides):
  """`section.field=value` strings onto a locked ConfigDict (a misspelt field is an error)."""
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"--set {item!r}: expected key=value")
    key, text = item.split("=", 1)
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *sections, field = key.split(".")
    node = config
    for s in sections:
      node = node[s]
    node[field] = value


def main(argv):
  del argv
  import jax
  import numpy as np

  from imagen_jax import cascade, demo
  from imagen_jax.data import shapes
  from imagen_jax.evals import shapes_metric
  from imagen_jax.nn import unet
  from imagen_jax.text import registry
  from imagen_jax.train import optim, trainer
  from imagen_jax.train import state as state_lib
  from imagen_jax.train import step as step_lib

  c = demo.load_config("configs/base64.py", _VARIANT.value)
  with c.unlocked():
    c.train.num_steps = _STEPS.value
  apply_overrides(c, _SET.value)
  evals = sorted({int(s) for s in _EVAL_STEPS.value})
  weights = [float(w) for w in _WEIGHTS.value]
  if not evals or evals[-1] > _STEPS.value or evals[0] < 0:
    raise ValueError(f"--eval_steps={_EVAL_STEPS.value} must lie in [0, --steps={_STEPS.value}]")
  os.makedirs(_OUTDIR.value, exist_ok=True)

  d = c.data
  builder = shapes.build_shapes(
      _DATA_DIR.value,
      int(d.resolution),
      num_train=int(d.num_train),
      num_test=int(d.num_test),
      seed=int(d.shapes_seed),
  )
  train = shapes.read_examples(builder, "train")
  test = shapes.read_examples(builder, "test", limit=_NUM_PROMPTS.value)
  images = np.stack([e["image"] for e in train]).astype(np.float32) * (2 / 255) - 1
  encoder = registry.get_text_encoder(c.text)
  ids, mask = encoder.tokenize([e["caption"] for e in train])
  prompts = [e["caption"] for e in test]

  model = unet.build_model(c.model)
  tx, lr_schedule = optim.make_optimizer(c.optim, _STEPS.value)
  image_size, _ = trainer.train_sizes(c)
  inputs = state_lib.model_inputs(
      batch=1,
      image_size=image_size,
      lowres_size=0,
      text_len=encoder.max_length,
      text_dim=encoder.dim,
  )
  seed = int(c.train.seed)
  state = jax.jit(state_lib.make_init_fn(model, tx, inputs))(jax.random.key(seed))
  step_fn = jax.jit(
      step_lib.make_train_step(
          model=model, tx=tx, lr_schedule=lr_schedule, config=c, encode_tokens=encoder.encode_tokens
      ),
      donate_argnums=0,
  )
  rng, key, batch = (
      np.random.default_rng(seed),
      jax.random.key(seed),
      int(c.train.global_batch_size),
  )

  rows, start = [], time.time()

  def evaluate(step):
    stage = cascade.Stage(workdir="", config=c, model=model, params=state.ema_params, step=step)
    model_cascade = cascade.Cascade([stage])
    for w in weights:
      settings = cascade.SamplingSettings(
          sampler="ddim", num_steps=_SAMPLE_STEPS.value, guidance_weight=w, threshold="dynamic"
      )
      (img,) = model_cascade.sample(prompts, [settings], seed=0, batch_size=192, progress=False)
      r = shapes_metric.score_images(
          list(cascade.to_uint8(img)),
          [e["attributes"] for e in test],
          [e["held_out"] for e in test],
      )
      row = dict(
          step=step,
          w=w,
          colour=r["mean"]["color"],
          shape=r["mean"]["shape"],
          exact=r["mean"]["exact"],
          held_colour=r["held_out"]["color"],
          held_shape=r["held_out"]["shape"],
          n=len(prompts),
          train_s=round(time.time() - start, 1),
      )
      rows.append(row)
      print(json.dumps(row), flush=True)
    with open(os.path.join(_OUTDIR.value, "rows.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)

  from tqdm import tqdm

  bar = tqdm(total=_STEPS.value, desc="train", unit="step")
  for step in range(_STEPS.value + 1):
    late = _DEADLINE.value and time.time() - start > _DEADLINE.value
    if step in evals or late or step == _STEPS.value:
      evaluate(step)
    if late or step == _STEPS.value:
      break
    idx = rng.integers(0, len(images), batch)
    host = {"image": images[idx], "text_ids": ids[idx], "text_mask": mask[idx]}
    state, _ = step_fn(state, host, key, encoder.params)
    bar.update(1)
  bar.close()

  table = gap_table(rows, weights, overrides=_SET.value)
  with open(os.path.join(_OUTDIR.value, "table.md"), "w") as f:
    f.write(table)
  print(table)


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


if __name__ == "__main__":
  app.run(main)
