"""Training metrics and images: TensorBoard (tensorboardX) + JSONL + PNG, on process 0 only.

`MetricWriter(workdir)` writes `workdir/metrics.jsonl` (one JSON object per logged step:
`{"step": s, "loss": ..., ...}`), TensorBoard event files under `workdir/tensorboard`, and image
grids as `workdir/samples/<name>_<step>.png`. On processes other than 0 every call is a no-op,
so callers need no `if jax.process_index() == 0`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Mapping

import jax
import numpy as np


def image_grid(images: np.ndarray, ncols: int | None = None) -> np.ndarray:
  """[N, H, W, C] float in [-1, 1] -> one uint8 [rows*H, ncols*W, C] grid (1 px gaps)."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"image_grid wants [N, H, W, C], got shape {images.shape}")
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + 1) - 1, ncols * (w + 1) - 1, c), 255, np.uint8)
  u8 = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    grid[r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = u8[i]
  return grid


class MetricWriter:
  """Scalars to TensorBoard + JSONL, images to PNG (+ TensorBoard), on process 0."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter  # only process 0 needs it
      except ImportError:  # declared in setup.py; JSONL + PNG still work without it
        logging.warning("tensorboardX is not installed: no TensorBoard events")
      else:
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in scalars.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)  # JSON has no NaN / inf
      if self._tb is not None:
        self._tb.add_scalar(k, v, int(step))
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> list[str]:
    """Saves each [N, H, W, C] batch in [-1, 1] as a PNG grid; returns the paths."""
    if not self.enabled:
      return []
    from PIL import Image

    out_dir = os.path.join(self.workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, batch in images.items():
      grid = image_grid(batch)
      path = os.path.join(out_dir, f"{name}_{int(step):08d}.png")
      Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(path)
      if self._tb is not None:
        self._tb.add_image(name, grid, int(step), dataformats="HWC")
      paths.append(path)
    return paths

  def write_text(self, step: int, name: str, text: str) -> None:
    """Text to TensorBoard and to `samples/<name>_<step>.txt` (e.g. a grid's prompts)."""
    if not self.enabled:
      return
    out_dir = os.path.join(self.workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}_{int(step):08d}.txt"), "w") as f:
      f.write(text + "\n")
    if self._tb is not None:
      self._tb.add_text(name, text, int(step))

  def flush(self) -> None:
    if self.enabled:
      if self._tb is not None:
        self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      if self._tb is not None:
        self._tb.close()
      self._jsonl.close()
      self.enabled = False
