"""The AOT cascade reports (`aot/compile_cascade.py --report_json`) as a check on sampling batches.

A report holds, for one TPU slice, the cascade's programs compiled ahead of time: the T5 encode
and, per stage, one guided denoiser step (`<stage>_step`) and the sampler loop (`<stage>_loop`),
each with its peak memory per chip, at one batch per stage. `stage_figures` turns it into one
line per stage, in cascade order: the batch compiled, the stage's peak per chip and whether it
fits. `Cascade` keeps every stage's params and T5's resident while any one program runs, so a
stage's peak is the larger of its two programs' peaks plus the params of the programs not
running (the report's `resident_gib`), judged against XLA's usable HBM (`usable_gib`); a report
without these (older, or cut short by a program that did not fit) is judged per program, as its
`fits` entries were: the program's own peak against the budget it records.

`check_batches` refuses a stage batch that no named report shows fitting: a stage fits at batch
b when a report compiled it at b' >= b and it fit there (memory grows with the batch; a report
at one batch can say nothing about a larger one). The error names the report and its figure.
"""

from __future__ import annotations

import json
from typing import Sequence

from imagen_jax import paths

PROGRAMS = ("step", "loop")


def stage_names(report: dict) -> list[str]:
  """The stages a report covers, in cascade order (its `<stage>_step` / `_loop` entries)."""
  names = []
  for key, value in report.items():
    stem, _, program = key.rpartition("_")
    if program in PROGRAMS and isinstance(value, dict) and stem and stem not in names:
      names.append(stem)
  return names


def stage_figures(report: dict) -> list[dict]:
  """One dict per stage of `report`, in cascade order: `name`, `batch` (compiled), `peak_gib`
  (per chip, with the others' params resident when the report records them), `budget_gib`,
  `fits`, and `figure` (the sentence that decided). A report's own `stages` list is returned
  as it is (aot/compile_cascade.py writes this function's result there)."""
  if "stages" in report:
    return [dict(s) for s in report["stages"]]
  resident = report.get("resident_gib")
  batches = report.get("stage_batches", {})
  out = []
  for name in stage_names(report):
    progs = [report[f"{name}_{p}"] for p in PROGRAMS if isinstance(report.get(f"{name}_{p}"), dict)]
    # A program XLA refused records only the memory it asked for (`needed_gib`).
    peaks = [float(p.get("peak_gib", p.get("needed_gib", 0.0)) or 0.0) for p in progs]
    # The budget: XLA's usable HBM; older reports judged against the chip's whole HBM.
    measured = [p for p in progs if "peak_gib" in p]
    budget, kind = report.get("usable_gib"), "usable"
    if budget is None and measured and "usable_gib" in measured[0]:
      budget = measured[0]["usable_gib"]
    if budget is None:
      budget, kind = (measured[0] if measured else report).get("hbm_gib"), "HBM"
    refused = any("peak_gib" not in p for p in progs)
    if resident and not refused:
      others = sum(resident.values()) - resident.get(name, 0.0)
      peak = max(peaks) + others
      fits = budget is not None and peak <= float(budget)
      how = f"{max(peaks):.2f} GiB + {others:.2f} GiB of the other programs' params resident"
    else:
      peak, fits = max(peaks), all(bool(p.get("fits", False)) for p in progs)
      how = "its largest program's own peak" + (", XLA refused it" if refused else "")
    budget_text = "?" if budget is None else f"{float(budget):.2f}"
    out.append(
        dict(
            name=name,
            batch=int(batches.get(name, report["batch"])),
            peak_gib=peak,
            budget_gib=None if budget is None else float(budget),
            fits=bool(fits),
            figure=(
                f"peak {peak:.2f} GiB per chip ({how}) "
                f"{'<=' if fits else '>'} {budget_text} GiB {kind}"
            ),
        )
    )
  return out


def read_report(path: str) -> dict:
  """A report's JSON, or a ValueError naming the file."""
  p = paths.path(path)
  if not p.exists():
    raise ValueError(f"aot_report {path!r} does not exist (write one with aot/compile_cascade.py)")
  try:
    report = json.loads(p.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"aot_report {path!r} is not JSON ({e})") from None
  if not isinstance(report, dict) or "batch" not in report:
    raise ValueError(f"aot_report {path!r} is not an aot/compile_cascade.py report (no batch)")
  return report


def check_batches(
    report_paths: Sequence[str], batches: Sequence[tuple[str, int, str]], num_devices: int
) -> None:
  """Refuses a stage batch that none of the reports shows fitting, naming the one that does.

  Args:
    report_paths: AOT cascade reports of this slice (`num_devices` chips), any batches.
    batches: per cascade stage, in order: `(setting, batch, stage_setting)`, the setting that
      gave the batch (e.g. `--config.batch_size`), its value, and the stage's own setting
      (`--config.stageK.batch_size`) to name in the advice.
    num_devices: the job's devices (all processes); a report of another chip count is refused.

  Raises ValueError (one line: the setting, its value, the report and figure that decided, and
  the largest batch a report shows fitting).
  """
  figures = []
  for path in report_paths:
    report = read_report(path)
    chips = int(report.get("chips", num_devices))
    if chips != num_devices:
      raise ValueError(
          f"aot_report {path!r} is for {report.get('topology', '?')} ({chips} chips) but this job "
          f"has {num_devices} devices; allowed: a report of this slice"
      )
    figures.append((path, stage_figures(report)))
  for k, (setting, b, stage_setting) in enumerate(batches):
    seen = [(path, f[k]) for path, f in figures if k < len(f)]
    if not seen:
      raise ValueError(
          f"{setting}={b} (stage {k + 1}): no aot_report covers stage {k + 1} "
          f"({', '.join(report_paths)}); allowed: reports of the whole cascade"
      )
    fitting = [(f["batch"], path, f) for path, f in seen if f["fits"]]
    if fitting:
      best, path, f = max(fitting, key=lambda t: t[0])
      if b <= best:
        continue
      hint = "" if setting == stage_setting else f" (set {stage_setting}={best})"
      raise ValueError(
          f"{setting}={b} (stage {k + 1}, {f['name']}) is above what the AOT report shows "
          f"fitting: {path} compiles {f['name']} at batch {best}, {f['figure']}; "
          f"allowed: <= {best}{hint}"
      )
    path, f = min(seen, key=lambda t: t[1]["batch"])
    raise ValueError(
        f"{setting}={b} (stage {k + 1}, {f['name']}): no AOT report shows a batch that fits; "
        f"{path} compiles {f['name']} at batch {f['batch']}, {f['figure']}; allowed: a batch a "
        f"report shows fitting (compile a smaller one: aot/compile_cascade.py "
        f"--cascade.stage{k + 1}.batch_size=N --report_json=...)"
    )
