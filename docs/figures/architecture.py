"""Draws docs/figures/architecture.png: the Imagen cascade (left) and the package layers (right).

  python docs/figures/architecture.py [--out=docs/figures/architecture.png]

Left: sampling through the cascade (Imagen §2, Fig. A.4): prompt -> frozen T5 -> base 64x64 ->
SR 64->256 -> SR 256->1024, with the per-stage sampling settings. Right: the package layers of
imagen_jax; an arrow points from the importing layer to the layer it imports.
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

# One colour per role, pale enough for black text.
TEXT = "#f3d9a4"  # frozen text encoder
STAGE = "#bcd7f0"  # diffusion stages
IO = "#e6e6e6"  # inputs and outputs
LIB = "#cfe8cf"  # library layers
APP = "#f4c9c3"  # applications
CFG = "#e2d4f0"  # configs
EDGE = "#444444"


def box(ax, x, y, w, h, title, body="", color=LIB, title_size=11.5, body_size=9):
  """A rounded box with a bold title and an optional smaller body, centred; (x, y) = lower left."""
  ax.add_patch(
      FancyBboxPatch(
          (x, y),
          w,
          h,
          boxstyle="round,pad=0,rounding_size=0.12",
          linewidth=1.2,
          edgecolor=EDGE,
          facecolor=color,
      )
  )
  if body:
    ax.text(
        x + w / 2,
        y + h * 0.68,
        title,
        ha="center",
        va="center",
        fontsize=title_size,
        fontweight="bold",
    )
    ax.text(
        x + w / 2,
        y + h * 0.30,
        body,
        ha="center",
        va="center",
        fontsize=body_size,
        color="#222222",
        linespacing=1.25,
    )
  else:
    ax.text(
        x + w / 2,
        y + h / 2,
        title,
        ha="center",
        va="center",
        fontsize=title_size,
        fontweight="bold",
    )


def arrow(ax, start, end, color=EDGE, style="-|>", lw=1.4, ls="-", rad=0.0):
  ax.add_patch(
      FancyArrowPatch(
          start,
          end,
          arrowstyle=style,
          mutation_scale=14,
          linewidth=lw,
          color=color,
          linestyle=ls,
          connectionstyle=f"arc3,rad={rad}",
          shrinkA=2,
          shrinkB=2,
      )
  )


def draw_cascade(ax):
  ax.set_xlim(-0.2, 9.6)
  ax.set_ylim(0, 16)
  ax.set_title("The cascade (sampling)", fontsize=15, fontweight="bold", pad=12)
  cx, w = 1.0, 5.0  # main column
  rows = [
      (14.3, 1.1, '"a large red circle above\na small blue square"', "", IO),
      (11.9, 1.5, "frozen T5 encoder", "text embeddings [B, L, D] + mask", TEXT),
      (9.1, 1.8, "base 64x64", "U-Net, text -> image", STAGE),
      (5.9, 1.8, "SR 64 -> 256", "Efficient U-Net", STAGE),
      (2.7, 1.8, "SR 256 -> 1024", "Efficient U-Net", STAGE),
      (0.4, 1.1, "1024 x 1024 image", "", IO),
  ]
  for y, h, title, body, color in rows:
    size = 10.5 if color == IO and "\n" in title else 12
    box(ax, cx, y, w, h, title, body, color=color, title_size=size)
  # Main flow down the column.
  for (y0, _, *_), (y1, h1, *_) in zip(rows[:-1], rows[1:]):
    arrow(ax, (cx + w / 2, y0), (cx + w / 2, y1 + h1))
  # Text embeddings reach every stage (pooled vector and cross-attention), routed on the left.
  gold, lx = "#b07d18", cx - 0.55
  t5_y = 11.9 + 0.75
  ax.plot([cx, lx, lx], [t5_y, t5_y, 2.7 + 0.9], color=gold, lw=1.1, ls="--")
  for y, h, *_ in rows[3:5]:
    arrow(ax, (lx, y + h / 2), (cx, y + h / 2), color=gold, lw=1.1, ls="--")
  ax.text(
      lx - 0.15,
      8.0,
      "text embeddings to every stage",
      ha="right",
      va="center",
      rotation=90,
      fontsize=9,
      color="#8a6212",
  )
  # Per-stage sampling settings.
  notes = [
      (9.1 + 0.9, "guidance weight w\ndynamic thresholding\n(p = 99.5)"),
      (5.9 + 0.9, "upsample 64 -> 256\n+ noise conditioning aug.\n(aug_level), w, thresholding"),
      (2.7 + 0.9, "upsample 256 -> 1024\n+ noise conditioning aug.\n(aug_level), w, thresholding"),
  ]
  for y, text in notes:
    ax.text(
        cx + w + 0.25,
        y,
        text,
        ha="left",
        va="center",
        fontsize=9,
        linespacing=1.3,
        bbox=dict(boxstyle="round,pad=0.3", facecolor="white", edgecolor="#999999"),
    )
  ax.axis("off")


def draw_layers(ax):
  ax.set_xlim(0, 16)
  ax.set_ylim(0, 16)
  ax.set_title("The package layers (an arrow: imports)", fontsize=15, fontweight="bold", pad=12)
  left, right = 0.9, 12.7  # library columns; configs stand to the right
  width = right - left
  # Applications on top.
  box(
      ax,
      left,
      13.0,
      width,
      2.0,
      "applications",
      "experiments/: demo.py, guidance sweeps, COCO FID-30K, DrawBench\nlaunch/: TPU pod, SLURM, local processes      benchmarks/",
      color=APP,
  )
  # evals on sampling.
  half = (width - 0.4) / 2
  cas_x = left + half + 0.4
  box(ax, cas_x, 9.9, half, 1.9, "evals", "FID, CLIP score, shapes metric, sweeps")
  # train and sampling side by side on the stage layer.
  box(ax, left, 6.6, half, 2.1, "train", "train step, optimizers, EMA,\ntrainer (hooks, resume)")
  box(
      ax,
      cas_x,
      6.6,
      half,
      2.1,
      "sampling",
      "cascade, sharded stage sampler,\nmulti-host, sample CLI",
  )
  mid = left + half + 0.2
  ax.text(mid, 7.65, "X", ha="center", va="center", fontsize=16, color="#b22222", fontweight="bold")
  ax.text(
      mid, 6.3, "never import\neach other", ha="center", va="top", fontsize=8.5, color="#b22222"
  )
  # The stage layer.
  box(
      ax,
      left,
      3.4,
      width,
      2.0,
      "stage  (imagen_jax/stage.py)",
      "network, schedule, target, conditioning (text / null text, SR upsample + aug_level),\n"
      "abstract params; checkpoint: EMA params restored alone",
  )
  # Bottom row.
  names = [
      ("data", "shapes,\ngrain loaders"),
      ("diffusion", "pure jnp\nmath"),
      ("nn", "Flax\nU-Nets"),
      ("text", "frozen T5,\ncache"),
      ("parallel", "mesh,\nshardings"),
      ("images", "uint8,\ngrids, sheets"),
  ]
  n = len(names)
  gap = 0.2
  bw = (width - gap * (n - 1)) / n
  for i, (title, body) in enumerate(names):
    box(ax, left + i * (bw + gap), 0.4, bw, 1.9, title, body, title_size=11, body_size=8.5)
  # Dependency arrows (importer -> imported).
  apps_y, evals_top = 13.0, 9.9 + 1.9
  arrow(ax, (left + half / 2, apps_y), (left + half / 2, 6.6 + 2.1))  # apps -> train
  arrow(ax, (cas_x + half / 2, apps_y), (cas_x + half / 2, evals_top))  # apps -> evals
  arrow(ax, (cas_x + half / 2, 9.9), (cas_x + half / 2, 6.6 + 2.1))  # evals -> sampling
  arrow(ax, (left + half / 2, 6.6), (left + half / 2, 3.4 + 2.0))  # train -> stage
  arrow(ax, (cas_x + half / 2, 6.6), (cas_x + half / 2, 3.4 + 2.0))  # sampling -> stage
  for i in range(1, 5):  # stage -> diffusion, nn, text, parallel
    x = left + i * (bw + gap) + bw / 2
    arrow(ax, (x, 3.4), (x, 0.4 + 1.9))
  # train -> data (the loader), routed down the left margin.
  gx, ty, dy = left - 0.45, 7.2, 1.35
  ax.plot([left, gx, gx], [ty, ty, dy], color=EDGE, lw=1.4)
  arrow(ax, (gx, dy), (left, dy))
  # configs beside, feeding every layer that builds from a config.
  cfg_x = right + 0.5
  cfg_w = 16 - cfg_x - 0.2
  box(ax, cfg_x, 3.4, cfg_w, 11.6, "", "", color=CFG)
  ax.text(
      cfg_x + cfg_w / 2, 14.3, "configs", ha="center", va="center", fontsize=11.5, fontweight="bold"
  )
  ax.text(
      cfg_x + cfg_w / 2,
      10.2,
      "importable\npackage,\none module\nper stage:\n\nbase64\nsr256\nsr1024\ncascade\n\n"
      'get_config(arg)\n"paper,batch=256"\n\nread by stage,\ntrain, cascade and\napplications',
      ha="center",
      va="center",
      fontsize=8.5,
      linespacing=1.3,
  )
  ax.axis("off")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "architecture.png")
  parser.add_argument("--out", default=default_out)
  args = parser.parse_args()
  fig, (ax_l, ax_r) = plt.subplots(
      1, 2, figsize=(16.5, 8.6), gridspec_kw={"width_ratios": [9.8, 16], "wspace": 0.02}
  )
  draw_cascade(ax_l)
  draw_layers(ax_r)
  fig.savefig(args.out, dpi=110, bbox_inches="tight", facecolor="white")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
