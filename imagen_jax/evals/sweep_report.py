"""Reporting of a guidance sweep (`sweep.run_sweep`'s rows): CSV, markdown table, Pareto plot
and a sample sheet, the layout of Imagen Figs. A.8 / A.11 (App. D). Every file is written
atomically (`imagen_jax.atomic`), so a reader never sees a half-written one.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Sequence

import numpy as np

from imagen_jax import atomic, images, paths
from imagen_jax.evals import provenance, sweep

TABLE_COLUMNS = (
    "setting",
    "weight",
    "alignment_color_shape",
    "shapes_color",
    "shapes_shape",
    "shapes_exact",
    "clip_score",
    "fd",
    "saturation_swept_stage",
    "saturation_final",
    "saturation_upper_final",
    "num_samples",
)


def write_outputs(
    result: sweep.SweepResult, outdir: str, title: str = "", grid_prompts: int = 6
) -> dict[str, str]:
  """`results.csv` (every column), `results.md` (the main columns), `pareto.png` and
  `samples.png` (the first `grid_prompts` prompts' final images at every point)."""
  rows = sorted(result.rows, key=lambda r: (r["setting"], r["weight"]))
  cols = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
  extra = sorted({k for r in rows for k in r} - set(cols) - {"settings", "artefact_key"})
  paths = {
      "csv": os.path.join(outdir, "results.csv"),
      "md": os.path.join(outdir, "results.md"),
      "png": os.path.join(outdir, "pareto.png"),
      "grid": os.path.join(outdir, "samples.png"),
  }
  buf = io.StringIO(newline="")
  w = csv.DictWriter(buf, fieldnames=cols + extra, extrasaction="ignore")
  w.writeheader()
  w.writerows(rows)
  atomic.write_text(paths["csv"], buf.getvalue())
  names = {
      "alignment_color_shape": "align (colour+shape)/2",
      "fd": result.fd_label or "FD",
      "saturation_swept_stage": "sat. swept stage",
      "saturation_final": "sat. final",
      "saturation_upper_final": "upper sat. final",
      "shapes_color": "colour",
      "shapes_shape": "shape",
      "shapes_exact": "exact",
      "clip_score": "CLIP score",
      "num_samples": "N",
      "weight": "w",
  }
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
  lines = ([f"### {title}", ""] if title else []) + [
      "| " + " | ".join(names.get(c, c) for c in cols) + " |",
      "|" + "---|" * len(cols),
  ]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
  lines += [
      "",
      f"Saturation: fraction of pixel values with |x| >= {sweep.SATURATION_LEVEL} in [-1, 1]; "
      f"upper saturation: x >= {sweep.SATURATION_LEVEL} only (colours clipped at the top).",
  ]
  if result.reference_saturation is not None:
    # Read saturation against the data: shapes images are pure colours on black, so most real
    # pixels are "saturated"; lower is not better there, closer to the reference is.
    lines[-1] += (
        f" Real reference images: {result.reference_saturation:.4g} and "
        f"{result.reference_saturation_upper:.4g} (compare with these, not with 0: "
        "e.g. shapes images are pure colours on a black background)."
    )
  negatives = sorted({r["negative_prompt"] for r in rows if r.get("negative_prompt") is not None})
  if negatives:  # which text guidance pushed away from (none: the null text)
    lines += [
        "",
        "Negative prompt (the unconditional half of guidance): "
        + ", ".join(repr(n) for n in negatives)
        + ".",
    ]
  atomic.write_text(paths["md"], "\n".join(lines) + "\n")
  plot_pareto(rows, paths["png"], x_metric=result.x_metric, fd_label=result.fd_label, title=title)
  write_sample_grid(rows, outdir, paths["grid"], grid_prompts)
  return paths


def write_sample_grid(rows: Sequence[dict], outdir: str, path: str, num_prompts: int) -> None:
  """One row per prompt, one column per point (ordered by setting, then w): the final stage's
  images, read back from each point's cached `samples.npz` (whose provenance key must be its
  row's)."""
  finals, prompts = [], None
  for r in rows:  # already sorted by (setting, weight)
    pdir = os.path.join(outdir, "points", r["key"])
    spath = os.path.join(pdir, "samples.npz")
    z = paths.load_npz(spath)
    stored = str(z[provenance.KEY_FIELD]) if provenance.KEY_FIELD in z else None
    if stored != r["artefact_key"]:  # the samples were replaced after the metrics were read
      raise provenance.StaleArtefactError(
          f"{spath}: provenance key {stored} is not the key of its row ({r['artefact_key']})"
      )
    stages = sorted(f for f in z if f.startswith("stage"))
    finals.append(z[stages[-1]][:num_prompts])
    if prompts is None:
      prompts = json.loads(paths.path(os.path.join(pdir, "prompts.json")).read_text())
      prompts = prompts[:num_prompts]
  cols = [f"{r['setting']} w={r['weight']:g}" for r in rows]
  grid = [[im[i] for im in finals] for i in range(len(prompts))]
  atomic.save_png(path, images.labelled_grid(grid, prompts, cols, cell=96, label_width=200))


def plot_pareto(
    rows: Sequence[dict], path: str, *, x_metric: str, fd_label: str, title: str = ""
) -> None:
  """Alignment (x) vs Frechet distance (y), one curve per setting, points labelled with w
  (the layout of Imagen Figs. A.8 / A.11). Falls back to saturation on y without an FD."""
  import matplotlib  # deferred: a 1 s import that only the plots need

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after use("Agg"): no display needed

  y_metric = "fd" if any("fd" in r for r in rows) else "saturation_final"
  x_metric = x_metric or "weight"
  fig, ax = plt.subplots(figsize=(6.4, 4.8))
  for setting in sorted({r["setting"] for r in rows}):
    pts = sorted((r for r in rows if r["setting"] == setting), key=lambda r: r["weight"])
    xs, ys = [r.get(x_metric, np.nan) for r in pts], [r.get(y_metric, np.nan) for r in pts]
    ax.plot(xs, ys, "o-", label=setting)
    for r, x, y in zip(pts, xs, ys):
      ax.annotate(
          f"w={r['weight']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
      )
  xlabels = {
      "clip_score": "CLIP score",
      "weight": "guidance weight w",
      "alignment_color_shape": "shapes alignment ((colour + shape) / 2)",
  }
  ax.set_xlabel(xlabels.get(x_metric, x_metric))
  ax.set_ylabel(fd_label if y_metric == "fd" else "fraction of saturated pixels (final)")
  ax.set_title(title or "guidance sweep")
  ax.margins(0.12)  # room for the w labels at the edges
  ax.grid(alpha=0.3)
  ax.legend(title="thresholding")
  fig.tight_layout()
  atomic.save_figure(path, fig, dpi=120)
  plt.close(fig)
