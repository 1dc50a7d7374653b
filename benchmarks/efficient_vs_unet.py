r"""Efficient U-Net vs the plain U-Net at a similar parameter count: speed and memory of a
training step (Imagen §2.5, App. B.1, D.3.2: the paper reports the Efficient U-Net more memory
efficient and 2-3x faster in steps per second than the standard U-Net).

  python benchmarks/efficient_vs_unet.py --steps=20 [--batch=16] [--json_out=bench.json]
  python benchmarks/efficient_vs_unet.py --arg=shapes \
      --arg="shapes,model=shapes_unet,model.base_channels=48"

Each `--arg` is a stage config argument of configs/base64.py (`VARIANT[,key=value,...]`, as
after the ':' of `--config=configs/base64.py:...`); the default pair is the demo's 32x32 base
network (`shapes`: an Efficient U-Net, App. B.1, 8.1M params) and the plain U-Net sized like it
(`shapes,model=shapes_unet`: App. F.1's block, 7.8M params; `imagen_jax.nn.presets` says how
it was sized). Both train on the config's batch (`--batch` overrides) and text input
`[B, text.max_length, text_dim]`.

Per network it measures the Adam step on the eps-MSE loss (benchmarks/train_step_bench.py):
parameters; model FLOPs per step (`nn.flops`: 3 x the forward's conv and matmul FLOPs) and
XLA's count; compile time; the median step time over --steps after one warm-up step (and the
process CPU time, the steadier figure on a shared machine), hence steps/s; XLA's memory
analysis of the compiled step (temporaries: the activations kept for the backward and the
workspace; arguments: params, Adam state and batch; XLA's peak of live buffers where the
backend reports one); and the peak resident memory of the process (`ru_maxrss`). With several
networks each is measured in its own child process, so that the peak RSS is its own.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile

import jax
import train_step_bench as bench  # benchmarks/ (this script's folder, first on sys.path)
from absl import flags

from configs import base64 as base64_config
from imagen_jax import atomic, cli
from imagen_jax.text import registry

FLAGS = flags.FLAGS
DEFAULT_ARGS = ["shapes", "shapes,model=shapes_unet"]
flags.DEFINE_multi_string(
    "arg", DEFAULT_ARGS, "stage config argument of configs/base64.py, one per network"
)
flags.DEFINE_integer("batch", 0, "batch size (0: the config's train.global_batch_size)")
flags.DEFINE_integer("steps", 10, "timed training steps (after one warm-up step)")
flags.DEFINE_string("json_out", "", "also write the rows (a JSON list, one per network) here")
flags.DEFINE_bool("in_process", False, "measure every network in this process (no children)")
flags.DEFINE_bool("print_table", True, "print the table (the children of a comparison do not)")

MIB = 2**20


def config_of(arg: str):
  """The base64 stage config of `arg`; a bad argument is a `cli.UserError` naming it."""
  try:
    return base64_config.get_config(arg)
  except ValueError as e:
    raise cli.UserError(f"--arg={arg}: {e}") from None


def measure(arg: str, batch: int, steps: int) -> dict:
  """The figures of the network of stage config `arg` (see the module docstring)."""
  c = config_of(arg)
  cfg, text = c.model, c.text
  b = batch or int(c.train.global_batch_size)
  ts = bench.build(cfg, text, b)
  model_flops, forward = ts.model_flops()
  step_s, cpu_s = ts.time(steps)
  mem = ts.memory()
  return dict(
      arg=arg,
      kind=cfg.kind,
      params=ts.num_params,
      batch=b,
      image_size=int(cfg.image_size),
      text=f"{text.name} [{text.max_length}, {registry.text_dim(text)}]",
      attention=ts.attention,
      model_gflop=model_flops / 1e9,
      attention_share=forward.attention / forward.total,
      xla_gflop=ts.xla_flops() / 1e9,
      compile_s=ts.compile_s,
      step_s=step_s,
      step_cpu_s=cpu_s,
      steps_per_s=1.0 / step_s,
      timed_steps=steps,
      **mem,
      peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
      device=f"{jax.devices()[0].platform} x{jax.device_count()}",
  )


def measure_in_child(arg: str, batch: int, steps: int) -> dict:
  """`measure` in a fresh process of this script (its own JAX state and peak RSS)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "row.json")
    command = [
        sys.executable,
        os.path.abspath(__file__),
        f"--arg={arg}",
        f"--batch={batch}",
        f"--steps={steps}",
        f"--json_out={out}",
        "--noprint_table",
    ]
    proc = subprocess.run(command, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"measuring --arg={arg} failed (exit {proc.returncode}): {command}")
    with open(out) as f:
      return json.load(f)[0]


def table(rows) -> str:
  """Markdown: one line per network."""
  lines = [
      "| network | config | params | GFLOP/step (model / XLA) | step s (CPU s) | steps/s "
      "| temp MiB | arguments MiB | XLA peak MiB | peak RSS MiB |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / MIB:.0f}"
    lines.append(
        f"| {r['kind']} | `{r['arg']}` | {r['params'] / 1e6:.2f}M | "
        f"{r['model_gflop']:.1f} / {r['xla_gflop']:.1f} | {r['step_s']:.3f} "
        f"({r['step_cpu_s']:.3f}) | {r['steps_per_s']:.2f} | {r['temp_bytes'] / MIB:.0f} | "
        f"{r['argument_bytes'] / MIB:.0f} | {peak} | {r['peak_rss_bytes'] / MIB:.0f} |"
    )
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.batch < 0 or FLAGS.steps < 1:
    raise cli.UserError(
        f"--batch={FLAGS.batch} --steps={FLAGS.steps}: allowed: batch >= 0 (0: the config's), "
        "steps >= 1"
    )
  args = list(FLAGS.arg)
  for arg in args:
    config_of(arg)  # every argument checked before anything is measured
  if len(args) == 1 or FLAGS.in_process:
    rows = [measure(arg, FLAGS.batch, FLAGS.steps) for arg in args]
  else:
    rows = [measure_in_child(arg, FLAGS.batch, FLAGS.steps) for arg in args]
  if FLAGS.json_out:
    atomic.write_json(FLAGS.json_out, rows)
  if FLAGS.print_table:
    print(f"batch {rows[0]['batch']}, {rows[0]['device']}, {FLAGS.steps} timed steps")
    print(table(rows), end="")


if __name__ == "__main__":
  cli.run(main)
