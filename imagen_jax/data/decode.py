"""Decoding user image files to RGB: the one place images from user files become pixels.

``load_rgb(path_or_bytes, background) -> uint8 [H, W, 3]`` decodes what a user may put in a
folder as a person would see it in an image viewer:

- EXIF orientation is applied (``PIL.ImageOps.exif_transpose``): a phone photo stored sideways
  with orientation tag 6 or 8 comes out upright.
- Transparency (RGBA, LA, palette or greyscale/RGB with a ``tRNS`` colour) is composited on
  ``background`` (default white, as image viewers and browsers show it):
  ``out = (rgb * a + background * (255 - a)) / 255`` rounded, a in [0, 255].
- 16-bit greyscale (PIL modes ``I;16*``, and ``I`` from a PNG, whose depth is at most 16 bits)
  is scaled to 8 bits by ``round(v * 255 / 65535)`` (PIL's own conversion clips at 255, which
  turns almost every 16-bit grey image white). 16-bit RGB / RGBA PNGs are reduced by PIL to
  their high byte, within one level of the same scaling.
- Palette, 1-bit, CMYK, YCbCr, LAB and HSV images go through PIL's RGB conversion.
- 32-bit integer images other than PNG and floating-point images (mode ``F``) have no stated
  value range and are refused with a ValueError naming the mode.

The whole file is decoded (``load``), so a truncated or corrupt file raises here (OSError /
ValueError / SyntaxError from PIL), never later.
"""

from __future__ import annotations

import io
import numbers
import os
from typing import Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageOps

WHITE = (255, 255, 255)
# EXIF tag 0x0112: 1 = stored upright; 2-8 = mirrored and/or rotated.
EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")

Source = Union[str, os.PathLike, bytes]


def check_background(background: Sequence[int]) -> tuple[int, int, int]:
  """``background`` as an (r, g, b) tuple of ints in [0, 255], or a ValueError naming it."""
  try:
    rgb = tuple(background)
  except TypeError:
    rgb = ()
  if len(rgb) != 3 or not all(
      isinstance(c, numbers.Integral) and not isinstance(c, bool) and 0 <= c <= 255 for c in rgb
  ):
    raise ValueError(
        f"background must be three ints in [0, 255] (r, g, b), e.g. {WHITE} for white; "
        f"got {background!r}"
    )
  return tuple(int(c) for c in rgb)


def orientation(img: PIL.Image.Image) -> int:
  """The image's EXIF orientation tag (1 = upright; 1 when there is none)."""
  return int(img.getexif().get(EXIF_ORIENTATION, 1))


def _scale_16bit(values: np.ndarray) -> np.ndarray:
  """uint16-range ints -> uint8 by round(v * 255 / 65535) (integer arithmetic, half up)."""
  v = values.astype(np.int64)
  if v.size and (v.min() < 0 or v.max() > 65535):
    raise ValueError(f"a 16-bit image holds values in [0, 65535], got [{v.min()}, {v.max()}]")
  return ((v * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb(img: PIL.Image.Image, background: Sequence[int] = WHITE) -> np.ndarray:
  """A decoded PIL image -> uint8 [H, W, 3] by the rules in the module docstring."""
  background = check_background(background)
  fmt = img.format  # the transposed copy below has no format
  img = PIL.ImageOps.exif_transpose(img)
  mode = img.mode
  if mode.startswith("I;16") or (mode == "I" and fmt == "PNG"):
    grey = _scale_16bit(np.asarray(img))
    return np.repeat(grey[..., None], 3, axis=-1)
  if mode in ("I", "F"):
    raise ValueError(
        f"image mode {mode!r} ({'32-bit integer' if mode == 'I' else 'floating point'}, "
        f"format {fmt}) has no stated value range; save it as 8- or 16-bit PNG or JPEG"
    )
  if mode in _ALPHA_MODES or "transparency" in img.info:
    rgba = np.asarray(img.convert("RGBA"), np.uint32)
    alpha = rgba[..., 3:]
    bg = np.asarray(background, np.uint32)
    out = (rgba[..., :3] * alpha + bg * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)
  return np.asarray(img.convert("RGB"), np.uint8)


def load_rgb(source: Source, background: Sequence[int] = WHITE) -> np.ndarray:
  """An image file (a path or its bytes) -> uint8 [H, W, 3] (see the module docstring).

  Raises OSError / ValueError / SyntaxError / PIL.Image.DecompressionBombError for anything
  that is not a complete image with a known value range.
  """
  background = check_background(background)
  fp = io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
  with PIL.Image.open(fp) as img:
    img.load()  # full decode: a truncated file raises here ("image file is truncated")
    return to_rgb(img, background)


def normalize_encoded(data: bytes, background: Sequence[int] = WHITE) -> tuple[bytes, str, tuple]:
  """An image file's bytes -> (encoded RGB, format, (height, width)), decoding all of it.

  An upright RGB JPEG (no EXIF rotation) is kept byte for byte; every other image is decoded by
  `to_rgb` and re-encoded losslessly as PNG. Raises OSError / ValueError / SyntaxError /
  PIL.Image.DecompressionBombError for anything that is not a complete, usable image.
  """
  with PIL.Image.open(io.BytesIO(data)) as img:
    img.load()  # full decode: a truncated file raises here ("image file is truncated")
    if img.format == "JPEG" and img.mode == "RGB" and orientation(img) == 1:
      return data, "jpeg", (img.height, img.width)
    rgb = to_rgb(img, background)
  buf = io.BytesIO()
  PIL.Image.fromarray(rgb).save(buf, format="PNG")
  return buf.getvalue(), "png", rgb.shape[:2]
