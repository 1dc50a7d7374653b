r"""Markdown tables of the AOT reports (the README's "Scale" tables).

    python aot/scale_table.py docs/results/scale/*.json [--steps=2500000]

Reports of `aot/compile_stage.py --report_json` make the training table; reports of
`aot/compile_cascade.py --report_json` (recognised by their "encode" entry) make the sampling
table: per slice, the peak per chip, seconds per image at the sampler settings, and the
chip-hours of a COCO FID-30K run.

One row per report, in cascade order (base64, sr256, sr1024), then by chip and slice: stage,
slice, mesh, global batch, compute dtype / remat / text, the attention the chip runs, XLA's
peak memory per chip against the HBM XLA lets a program use and whether it fits, the model
TFLOP (3 x forward, no remat, no T5) and XLA's TFLOP per step per chip (+ the flash kernel's
backward, which XLA does not count), the roofline step
time, the MFU bound (model FLOPs / (roofline x peak)) and the chip-days of `--steps` training
steps at the roofline (a lower bound: the roofline leaves out inter-chip communication and is
reached by no real program). A `aot/proxy.py` report is marked "(proxy)". Reports
written before these figures existed show "n/a" for what they lack (their peak is the buffer
sum, marked so; their FLOPs bound counted XLA's FLOPs, remat and T5 included, and is not shown
as an MFU bound).
"""

from __future__ import annotations

import json

from absl import app, flags

from imagen_jax import cli

_STEPS = flags.DEFINE_integer("steps", 2_500_000, "training steps (Imagen §4.1: 2.5M)")

NA = "n/a"

HEADER = (
    "| stage | slice (chips) | mesh data x fsdp x tensor | batch | dtype, remat, text | attn | "
    "peak GiB / chip | usable GiB | fits | model TFLOP / step / chip | "
    "XLA (+ kernel) TFLOP / step / chip | roofline step | MFU bound | chip-days |"
)


def _num(r: dict, key: str, fmt: str) -> str:
  v = r.get(key)
  return NA if v is None else format(v, fmt)


def _peak(r: dict) -> str:
  if "peak_gib" not in r:
    need = r.get("needed_gib")
    return NA if need is None else f"{need:.1f} (XLA refused)"
  # Reports without `xla_peak` give the buffer sum (arguments + outputs - aliased + temps).
  return f"{r['peak_gib']:.1f}" + ("" if r.get("xla_peak") else " (buffer sum)")


def row(r: dict, steps: int) -> str:
  mesh = " x ".join(str(r["mesh"].get(a, 1)) for a in ("data", "fsdp", "tensor"))
  text = "T5 in the step" if r["text"] == "step" else "cached T5"
  kept = r.get("remat_policy", "nothing")
  remat = ("remat" if kept == "nothing" else f"remat ({kept} kept)") if r["remat"] else "no remat"
  setup = f"{r['dtype']}, {remat}, {text}"
  slice_ = f"{r['topology']} ({r['chips']})"
  accum = int(r.get("grad_accum_steps", 1))
  batch = f"{r['batch']}" + (f" ({accum} x {r['batch'] // accum})" if accum > 1 else "")
  usable = _num(r, "usable_gib", ".2f")
  # `fits` against the usable HBM only where the report judged it so.
  fits = NA if "usable_gib" not in r else ("yes" if r.get("fits") else "no")
  stage = r["stage"] + (" (proxy)" if r.get("proxy") else "")  # aot/proxy.py
  head = (
      f"| {stage} | {slice_} | {mesh} | {batch} | {setup} | {r.get('attn', NA)} | "
      f"{_peak(r)} | {usable} | {fits} | {_num(r, 'model_tflop', '.1f')} |"
  )
  if "roofline_s" not in r:
    return head + " | | | |"
  days = r["roofline_s"] * steps * r["chips"] / 86400
  mfu = NA if "usable_gib" not in r else _num(r, "mfu_bound", ".0%")
  # The flash kernel's backward, which XLA does not count, shown beside XLA's figure.
  kernel = f" + {r['kernel_tflop']:.1f}" if r.get("kernel_tflop") else ""
  return head + f" {r['tflop']:.1f}{kernel} | {r['roofline_s']:.2f} s | {mfu} | {days:,.0f} |"


CASCADE_HEADER = (
    "| slice (chips) | mesh | batch | stages (sampler x steps, w) | peak GiB / chip | "
    "usable GiB | fits | s / image (roofline) | FID-30K chip-hours |"
)


def cascade_row(r: dict) -> str:
  mesh = " x ".join(str(r["mesh"].get(a, 1)) for a in ("data", "fsdp", "tensor"))
  stages = ", ".join(
      f"{k[: -len('_settings')]} {v['sampler']} x {v['num_steps']}, w={v['w']:g}"
      for k, v in r.items()
      if k.endswith("_settings")
  )
  # Reports without `resident_gib` give the largest program alone, without the other
  # stages' and T5's resident params.
  peak = f"{r['peak_gib']:.1f}" + ("" if "resident_gib" in r else " (one program)")
  fits = NA if "usable_gib" not in r else ("yes" if r["fits"] else "no")
  own = {k: b for k, b in r.get("stage_batches", {}).items() if b != r["batch"]}
  batch = f"{r['batch']}" + "".join(f", {k} {b}" for k, b in own.items())
  return (
      f"| {r['topology']} ({r['chips']}) | {mesh} | {batch} | {stages} | {peak} | "
      f"{_num(r, 'usable_gib', '.2f')} | {fits} | {r['s_per_image']:.3f} s | "
      f"{r['fid30k_chip_hours']:,.1f} |"
  )


STAGE_ORDER = ("base64", "sr256", "sr1024")


def order(r: dict) -> tuple:
  """Sort key: the cascade's stage order, then the chip (v4, v5e, v5p) and the slice size."""
  stage = r.get("stage", "")
  chip, _, size = r.get("topology", "").partition("-")
  rank = STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)
  return rank, stage, chip, int(size) if size.isdigit() else 0


def table(header: str, rows: list[str]) -> list[str]:
  return [header, "|" + "---|" * header.count(" |"), *rows]


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError("give one or more --report_json files of aot/compile_stage.py")
  reports = []
  for p in paths:
    cli.require_file("report_json", p, "report (a file that aot/compile_stage.py wrote)")
    with open(p) as f:
      reports.append(json.load(f))
  reports.sort(key=order)
  train = [row(r, _STEPS.value) for r in reports if "encode" not in r]
  sampling = [cascade_row(r) for r in reports if "encode" in r and "s_per_image" in r]
  lines = table(HEADER, train) if train else []
  if sampling:
    lines += ([""] if lines else []) + table(CASCADE_HEADER, sampling)
  print("\n".join(lines))


if __name__ == "__main__":
  cli.run(main)
