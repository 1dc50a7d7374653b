"""PNG grids with text labels (sample sheets for people to look at)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont


def _font(size: int = 11):
  try:
    return PIL.ImageFont.load_default(size=size)
  except TypeError:  # older Pillow: fixed-size bitmap font
    return PIL.ImageFont.load_default()


def labelled_grid(
    rows: Sequence[Sequence[np.ndarray]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    cell: int = 128,
    label_width: int = 260,
    pad: int = 4,
) -> PIL.Image.Image:
  """A table of images: one row per prompt, one column per stage.

  Args:
    rows: rows[r][c] is a uint8 image [H, W, 3] (any size; resized to `cell` with nearest
      neighbour so that pixels stay visible).
    row_labels: text left of each row (wrapped); col_labels: column headers.
  """
  font = _font()
  n_rows, n_cols = len(rows), max(len(r) for r in rows)
  header = 18
  width = label_width + n_cols * (cell + pad) + pad
  height = header + n_rows * (cell + pad) + pad
  sheet = PIL.Image.new("RGB", (width, height), (255, 255, 255))
  draw = PIL.ImageDraw.Draw(sheet)
  for c, name in enumerate(col_labels):
    draw.text((label_width + pad + c * (cell + pad), 2), name, fill=(0, 0, 0), font=font)
  for r, (images, label) in enumerate(zip(rows, row_labels)):
    y = header + pad + r * (cell + pad)
    draw.multiline_text((pad, y), _wrap(label, 40), fill=(0, 0, 0), font=font)
    for c, img in enumerate(images):
      tile = PIL.Image.fromarray(np.asarray(img, np.uint8)).resize((cell, cell), PIL.Image.NEAREST)
      sheet.paste(tile, (label_width + pad + c * (cell + pad), y))
  return sheet


def _wrap(text: str, width: int) -> str:
  words, lines, line = text.split(), [], ""
  for w in words:
    if line and len(line) + 1 + len(w) > width:
      lines.append(line)
      line = w
    else:
      line = f"{line} {w}".strip()
  lines.append(line)
  return "\n".join(lines)
