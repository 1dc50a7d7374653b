r"""Markdown table of `launch/aot_compile.py --report_json` files (the README's "Scale" table).

    python launch/scale_table.py docs/results/scale/*.json [--steps=2500000]

One row per report: stage, slice, mesh, global batch, compute dtype / remat / text, per-chip
peak memory against HBM, XLA TFLOP per step per chip, the roofline step time and its MFU bound,
and the chip-days of `--steps` training steps at the roofline (a lower bound: the roofline
leaves out inter-chip communication and is reached by no real program).
"""

from __future__ import annotations

import json

from absl import app, flags

_STEPS = flags.DEFINE_integer("steps", 2_500_000, "training steps (Imagen §4.1: 2.5M)")

HEADER = (
    "| stage | slice (chips) | mesh data x fsdp x tensor | batch | dtype, remat, text | "
    "peak / HBM per chip | TFLOP / step / chip | roofline step | MFU bound | chip-days |"
)


def row(r: dict, steps: int) -> str:
  mesh = " x ".join(str(r["mesh"].get(a, 1)) for a in ("data", "fsdp", "tensor"))
  text = "T5 in the step" if r["text"] == "step" else "cached T5"
  setup = f"{r['dtype']}, {'remat' if r['remat'] else 'no remat'}, {text}"
  slice_ = f"{r['topology']} ({r['chips']})"
  if not r.get("fits") and "roofline_s" not in r:
    need = r.get("needed_gib")
    peak = f"{need:.1f} / {r['hbm_gib']:.2f} GiB: does not fit" if need else "does not fit"
    return f"| {r['stage']} | {slice_} | {mesh} | {r['batch']} | {setup} | {peak} | | | | |"
  days = r["roofline_s"] * steps * r["chips"] / 86400
  fits = "" if r["fits"] else ": does not fit"
  return (
      f"| {r['stage']} | {slice_} | {mesh} | {r['batch']} | {setup} | "
      f"{r['peak_gib']:.1f} / {r['hbm_gib']:.0f} GiB{fits} | {r['tflop']:.1f} | "
      f"{r['roofline_s']:.2f} s | {r['mfu_bound']:.0%} | {days:,.0f} |"
  )


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError("give one or more --report_json files of launch/aot_compile.py")
  reports = []
  for p in paths:
    with open(p) as f:
      reports.append(json.load(f))
  print(HEADER)
  print("|" + "---|" * HEADER.count(" |"))
  for r in reports:
    print(row(r, _STEPS.value))


if __name__ == "__main__":
  app.run(main)
