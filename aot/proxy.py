r"""A stage's per-chip AOT figures from two smaller compiles: the network with fewer blocks.

    python aot/proxy.py --config=configs/base64.py:paper --topology=v4-512 --text=cache

Compiling a paper stage takes 10 to 75 minutes on a CPU machine; a network with a fraction of
its residual blocks compiles in a fraction of that. The per-chip figures of the step are
linear in the number of blocks: each block adds the same convs, matmuls and attention to every
step (FLOPs, bytes accessed, model FLOPs), its params and optimizer state to the arguments,
and, under remat, its saved input to the live set at the peak (one block's working set is the
same whatever the count) once every level has one block: a level's first block changes its
width and costs more than the next (from 0 and 1 blocks the tiny base's figures extrapolate
10 to 13% high). So two proxies, at block counts s_a * n and s_b * n (n: the config's
`model.num_res_blocks`, per level for the Efficient U-Net; s_a = (g - 2)/g, s_b = (g - 1)/g,
g >= 3 the counts' greatest common divisor: 1 and 2 of the base's 3 blocks), give each
figure f at the full count by

    f(1) = f(s_b) + (1 - s_b) / (s_b - s_a) * (f(s_b) - f(s_a))

on the same slice, mesh, batch and text (the same per-chip program apart from the blocks).
The roofline, `fits` (against XLA's usable HBM) and the MFU bound follow from the
extrapolated figures. Each proxy is `aot/compile_stage.py` in a child process; their reports
and the extrapolation go to `--report_json`. One line for scripts:

    proxy: stage=base64 topology=v4-512 blocks=1,2->3 peak_gib=.. usable_gib=.. fits=..
    model_tflop=.. step_tflop=.. roofline_s=.. mfu_bound=..

Exit status: 0 fits, 1 does not fit, 2 bad input or a proxy that did not compile.
"""

from __future__ import annotations

import fractions
import json
import math
import os
import subprocess
import sys
import tempfile

from absl import app, flags
from ml_collections import config_flags

from imagen_jax.parallel import aot

_CONFIG = config_flags.DEFINE_config_file("config", None, "stage config", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v4-512")
_TEXT = flags.DEFINE_enum("text", None, ["step", "cache"], "as aot/compile_stage.py")
_REPORT = flags.DEFINE_string("report_json", None, "also write the figures to this JSON file")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Per-chip figures that are linear in the block count (GiB, TFLOP, GB per step).
LINEAR = (
    "argument_gib",
    "output_gib",
    "alias_gib",
    "temp_gib",
    "peak_gib",
    "tflop",
    "kernel_tflop",
    "model_tflop",
    "gbytes_accessed",
)


def fail(message: str, status: int = 2):
  print(f"proxy: {message}", file=sys.stderr)
  sys.exit(status)


def proxy_scales(blocks: tuple[int, ...]) -> tuple[fractions.Fraction, fractions.Fraction]:
  """The two largest fractions s < 1 with s * n whole for every block count n, both keeping
  at least one block per level: (g - 2)/g and (g - 1)/g, g = gcd of the counts, g >= 3."""
  g = math.gcd(*blocks)
  if g < 3:
    raise ValueError(
        f"model.num_res_blocks={blocks}: no two smaller block counts in proportion with at "
        f"least one block per level (their greatest common divisor is {g}); allowed: counts "
        "with a common divisor of at least 3"
    )
  return fractions.Fraction(g - 2, g), fractions.Fraction(g - 1, g)


def extrapolate(a: dict, b: dict, s_a: float, s_b: float) -> dict:
  """Each LINEAR figure of reports `a` (at s_a) and `b` (at s_b) taken to s = 1."""
  k = (1 - s_b) / (s_b - s_a)
  return {key: b[key] + k * (b[key] - a[key]) for key in LINEAR}


def run_proxy(blocks, extra: list[str], report: str) -> dict:
  value = str(blocks[0]) if len(blocks) == 1 else "(" + ",".join(map(str, blocks)) + ",)"
  cmd = [
      sys.executable,
      os.path.join(ROOT, "aot", "compile_stage.py"),
      *extra,
      f"--config.model.num_res_blocks={value}",
      f"--report_json={report}",
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), cwd=ROOT)
  print(proc.stdout, end="", flush=True)
  if not os.path.exists(report) or proc.returncode not in (0, 1):
    fail(f"the proxy with num_res_blocks={value} did not compile:\n{proc.stderr[-3000:]}")
  with open(report) as f:
    data = json.load(f)
  if "roofline_s" not in data:
    fail(f"the proxy with num_res_blocks={value} does not fit (XLA refused it)", 1)
  return data


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _TOPOLOGY.value is None:
    raise app.UsageError("--config and --topology are required")
  c = _CONFIG.value
  n = c.model.num_res_blocks
  blocks = (int(n),) if isinstance(n, int) else tuple(int(x) for x in n)
  try:
    s_a, s_b = proxy_scales(blocks)
  except ValueError as e:
    fail(str(e))
  # The child gets the same config and overrides, then the proxy's block count.
  extra = [a for a in sys.argv[1:] if a.startswith(("--config", "--topology", "--text"))]
  extra = [a for a in extra if not a.startswith("--config.model.num_res_blocks")]
  with tempfile.TemporaryDirectory() as tmp:
    reports = [
        run_proxy(tuple(int(x * s) for x in blocks), extra, os.path.join(tmp, f"{i}.json"))
        for i, s in enumerate((s_a, s_b))
    ]
  a, b = reports
  full = extrapolate(a, b, float(s_a), float(s_b))
  chip = aot.CHIPS[aot.parse_topology(_TOPOLOGY.value).generation]
  compute_s = (full["tflop"] + full["kernel_tflop"]) * 1e12 / (chip.peak_tflops * 1e12)
  memory_s = full["gbytes_accessed"] * 1e9 / (chip.hbm_tbps * 1e12)
  roofline_s = max(compute_s, memory_s)
  usable = b["usable_gib"]
  full.update(
      compute_s=compute_s,
      memory_s=memory_s,
      roofline_s=roofline_s,
      mfu_bound=full["model_tflop"] * 1e12 / (roofline_s * chip.peak_tflops * 1e12),
      fits=full["peak_gib"] <= usable,
  )
  keep = (
      "stage",
      "variant",
      "topology",
      "chips",
      "chip",
      "mesh",
      "batch",
      "dtype",
      "remat",
      "remat_policy",
  )
  summary = {k: b[k] for k in (*keep, "text", "attn", "usable_gib", "hbm_gib", "xla_peak")}
  summary.update(
      full, proxy=True, proxy_blocks=[list(map(int, (x * s_a, x * s_b))) for x in blocks]
  )
  summary["proxies"] = {"s_a": a, "s_b": b}
  summary["proxy_compile_s"] = a["compile_s"] + b["compile_s"]
  aot.write_report(_REPORT.value, summary)
  low = ",".join(str(int(x * s_a)) for x in blocks)
  high = ",".join(str(int(x * s_b)) for x in blocks)
  print(
      f"proxy: stage={c.stage} topology={_TOPOLOGY.value} blocks={low};{high}->"
      f"{','.join(map(str, blocks))} attn={b['attn']} peak_gib={full['peak_gib']:.2f} "
      f"usable_gib={usable:.2f} fits={'yes' if full['fits'] else 'no'} "
      f"model_tflop={full['model_tflop']:.3f} step_tflop={full['tflop']:.3f} "
      f"roofline_s={roofline_s:.4f} mfu_bound={full['mfu_bound']:.3f} "
      f"compile_s={summary['proxy_compile_s']:.0f}"
  )
  if not full["fits"]:
    sys.exit(1)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  app.run(main)
