"""Images for people and files: float [-1, 1] -> uint8, image grids, labelled sample sheets.

The models work on images in [-1, 1] (Imagen §2.1 trains on pixels scaled to [-1, 1]); a PNG
stores uint8. `to_uint8` is the one conversion in the project (one rounding rule), `image_grid`
tiles a batch into one array (`save_grid` writes it as a PNG), `labelled_grid` lays out a table of images with text labels.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from imagen_jax import atomic


def to_uint8(images) -> np.ndarray:
  """Float images in [-1, 1] (any shape) -> uint8, `floor((x + 1) * 127.5 + 0.5)` clipped to
  [0, 255].

  Round half up (not numpy's half to even) so that the map is monotone and a value exactly
  between two levels always goes the same way; `x / 127.5 - 1` inverts it on the 256 levels.
  """
  x = np.asarray(images)
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"to_uint8 wants float images in [-1, 1], got dtype {x.dtype}")
  x = x.astype(np.float32)
  return np.clip(np.floor((x + 1.0) * 127.5 + 0.5), 0, 255).astype(np.uint8)


def from_uint8(images) -> np.ndarray:
  """uint8 images -> float32 in [-1, 1], `x / 127.5 - 1` (the inverse of `to_uint8`)."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"from_uint8 wants uint8 images, got dtype {images.dtype}")
  return images.astype(np.float32) / 127.5 - 1.0


def image_grid(images, ncols: int | None = None, *, gap: int = 1) -> np.ndarray:
  """Tiles a batch into one uint8 image on a white background.

  Args:
    images: `[N, H, W, C]`, float in [-1, 1] (converted with `to_uint8`) or uint8.
    ncols: columns (default: ceil(sqrt(N))); rows = ceil(N / ncols).
    gap: white pixels between tiles.
  Returns: uint8 `[rows * (H + gap) - gap, ncols * (W + gap) - gap, C]`.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"image_grid wants [N, H, W, C], got shape {images.shape}")
  if ncols is not None and ncols < 1:
    raise ValueError(f"ncols must be >= 1, got {ncols}")
  u8 = images if images.dtype == np.uint8 else to_uint8(images)
  n, h, w, c = u8.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + gap) - gap, ncols * (w + gap) - gap, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    grid[r * (h + gap) : r * (h + gap) + h, col * (w + gap) : col * (w + gap) + w] = u8[i]
  return grid


def save_grid(images, path: str, ncols: int | None = None) -> str:
  """`image_grid(images, ncols)` written atomically as a PNG at `path`; returns the path.

  images: `[N, H, W, C]` float in [-1, 1] or uint8 (e.g. one stage's output of
  `cascade.Cascade.sample`).
  """
  return atomic.save_png(path, image_grid(images, ncols))


def to_pil(image: np.ndarray) -> PIL.Image.Image:
  """uint8 `[H, W, C]` (C = 1 or 3) -> a PIL image (grey for C = 1)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = to_uint8(image)
  return PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


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
  """A table of images with text: one row per prompt, one column per stage / setting.

  Args:
    rows: rows[r][c] is an image `[H, W, 3]`, uint8 or float in [-1, 1] (any size; resized
      to `cell` with nearest neighbour so that pixels stay visible).
    row_labels: text left of each row (wrapped); col_labels: column headers.
  Returns: an RGB image of width `label_width + n_cols * (cell + pad) + pad`.
  """
  if len(rows) != len(row_labels):
    raise ValueError(f"{len(rows)} rows of images but {len(row_labels)} row labels")
  font = _font()
  n_rows, n_cols = len(rows), max((len(r) for r in rows), default=0)
  header = 18
  width = label_width + n_cols * (cell + pad) + pad
  height = header + n_rows * (cell + pad) + pad
  sheet = PIL.Image.new("RGB", (width, height), (255, 255, 255))
  draw = PIL.ImageDraw.Draw(sheet)
  for c, name in enumerate(col_labels):
    draw.text((label_width + pad + c * (cell + pad), 2), name, fill=(0, 0, 0), font=font)
  for r, (row, label) in enumerate(zip(rows, row_labels)):
    y = header + pad + r * (cell + pad)
    draw.multiline_text((pad, y), _wrap(label, 40), fill=(0, 0, 0), font=font)
    for c, img in enumerate(row):
      tile = to_pil(img).convert("RGB").resize((cell, cell), PIL.Image.NEAREST)
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
