"""Exact text-image alignment score for the shapes dataset.

From an image, recover the shapes (colour, kind, size, position) and compare them with the
attributes behind the caption. The recovery inverts the renderer of `imagen_jax.data.shapes`:

1. colour segmentation: a pixel of a shape is bg + alpha (palette colour - bg) (on the default
   black background bg = 0: alpha * palette colour), so each pixel minus the background is
   projected onto each palette colour's line from the background; the best line gives the
   colour and alpha. Foreground = alpha >= 0.5 and within 30 degrees of that line. The
   background is black unless given (`background`: an RGB colour, or "border": per image, the
   per-channel median of its outermost pixel ring, which no shape of the layout reaches; it
   follows a grey or faintly textured background, and a generated image's shifted one).
2. connected components (8-connected) of the foreground (with a given background: of each
   colour's foreground separately, so noise does not merge into one blob); tiny ones (< 1/4 of
   the smallest shape's area) are noise. A component's colour = alpha-weighted vote of its
   pixels; its soft area and centroid use alpha over the component grown by one pixel (the
   anti-aliased rim).
3. kind: for each kind, render the template of the same area, centred at the same centroid
   (the triangle's centroid sits d/6 below its box centre), and take the best soft IoU.
   Size: the template's box side against the geometric mean of the two sizes.
   Position: the nearest layout cell to the box centre. With a given background, a component
   whose best IoU is below `MIN_IOU_OFF_BLACK` is no shape (noise fragments).

Scores per example (each in [0, 1]; missing objects score 0):
  color / shape / size: fraction of the caption's objects whose attribute is recovered, after
    matching caption objects to detected shapes by attribute agreement;
  position: one object: its cell is right; two objects: their relation (above / below / left /
    right, judged by the dominant axis of their displacement) is right;
  count: the number of detected shapes equals the caption's; exact: all of the above right.

Chance levels (uniformly random guesses, see `CHANCE`): colour 1/6, shape 1/3, size 1/2,
position 1/5 for one object and 1/4 for a relation, so ~0.225 on the 50/50 mix. Noise images
score lower than chance on most attributes because usually nothing is detected (a miss is 0).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, Sequence

import numpy as np
import scipy.ndimage

from imagen_jax.data import shapes

CHANCE = {
    "color": 1.0 / len(shapes.COLOR_NAMES),
    "shape": 1.0 / len(shapes.SHAPE_NAMES),
    "size": 1.0 / len(shapes.SIZE_NAMES),
    "position": 0.5 * (1.0 / len(shapes.POSITION_NAMES)) + 0.5 * (1.0 / len(shapes.RELATION_NAMES)),
}
ATTRIBUTES = ("color", "shape", "size", "position", "count", "exact")
_AREA_FACTOR = (np.pi / 4.0, 1.0, 0.5)  # area / box side^2 for circle, square, triangle
# Off black, a component counts as a shape only when its best template's soft IoU reaches this
# (the dataset's own shapes: >= 0.9 at 32x32): there the 30-degree cones around the palette
# lines cover most directions from the background, so noise leaves many one-colour fragments.
MIN_IOU_OFF_BLACK = 0.5
_MAX_ANGLE_SIN = 0.5  # a foreground pixel is within 30 degrees of its palette colour
_UNIT = shapes.PALETTE / np.linalg.norm(shapes.PALETTE, axis=1, keepdims=True)


@dataclasses.dataclass
class Detection:
  """One recovered shape. center_xy: box centre in pixels; box: side in pixels."""

  color: int
  shape: int
  size: int
  position: int
  center_xy: tuple[float, float]
  box: float
  area: float
  iou: float


def to_pixels(image: Any) -> np.ndarray:
  """uint8 [H, W, 3] or float [H, W, 3] in [-1, 1] -> float32 [H, W, 3] in [0, 255]."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an image [H, W, 3], got shape {image.shape}")
  if image.dtype == np.uint8:
    return image.astype(np.float32)
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(f"expected uint8 or float in [-1, 1], got dtype {image.dtype}")
  return np.clip((image.astype(np.float32) + 1.0) * 127.5, 0.0, 255.0)


Background = None | str | Sequence[float]


def background_color(pixels: np.ndarray, background: Background = None) -> np.ndarray | None:
  """The background RGB in [0, 255] of one image [H, W, 3] (None: black, the default).

  background: None (black), "border" (per-channel median of the outermost pixel ring), or an
  RGB triple in [0, 255] (e.g. `shapes.GREY_LEVEL` on every channel).
  """
  if background is None:
    return None
  if isinstance(background, str):
    if background != "border":
      raise ValueError(f"background {background!r} is not None, 'border' or an RGB triple")
    ring = np.concatenate(
        [pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]], axis=0
    )  # [4R - 4, 3]
    return np.median(ring, axis=0).astype(np.float32)
  bg = np.asarray(background, np.float32)
  if bg.shape != (3,):
    raise ValueError(f"background must be an RGB triple, got shape {bg.shape}")
  return bg


def classify_pixels(
    pixels: np.ndarray, background: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """[H, W, 3] in [0, 255] -> (colour id [H, W], alpha [H, W, K] per palette colour, fg).

  background: RGB [3] in [0, 255] or None (black). With bg, pixel p, palette colour c_k:
  alpha_k = (p - bg) . (c_k - bg) / |c_k - bg|^2 and the angle is that of p - bg to c_k - bg.
  """
  p = pixels.reshape(-1, 3)
  if background is None:  # black: the palette colours themselves are the lines
    lines, unit = shapes.PALETTE, _UNIT
  else:
    p = p - background[None, :]
    lines = shapes.PALETTE - background[None, :]
    unit = lines / np.maximum(np.linalg.norm(lines, axis=1, keepdims=True), 1e-6)
  norm = np.linalg.norm(p, axis=1) + 1e-6
  cos = (p @ unit.T) / norm[:, None]  # [N, K]
  best = np.argmax(cos, axis=1)
  alpha = (p @ lines.T) / np.maximum(np.sum(lines**2, axis=1), 1e-6)[None, :]
  sin = np.sqrt(np.clip(1.0 - np.max(cos, axis=1) ** 2, 0.0, 1.0))
  fg = (alpha[np.arange(len(p)), best] >= 0.5) & (sin < _MAX_ANGLE_SIN)
  h, w = pixels.shape[:2]
  return best.reshape(h, w), np.clip(alpha, 0.0, 1.0).reshape(h, w, -1), fg.reshape(h, w)


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def detect(image: Any, *, max_objects: int = 4, background: Background = None) -> list[Detection]:
  """Recovers the shapes of one image, largest first (at most `max_objects`); `background`
  as in `background_color` (None: black)."""
  pixels = to_pixels(image)
  res = pixels.shape[0]
  if pixels.shape[1] != res:
    raise ValueError(f"shapes images are square, got {pixels.shape[:2]}")
  best, alpha, fg = classify_pixels(pixels, background_color(pixels, background))
  eight = np.ones((3, 3), bool)
  if background is None:
    labels, num = scipy.ndimage.label(fg, structure=eight)
  else:
    # Components of one colour each: off black, noise is foreground almost everywhere (every
    # direction from grey is near some palette line) and would merge into one blob, while a
    # shape's pixels, rim included, all lie on its colour's line.
    labels, num = np.zeros(fg.shape, np.int32), 0
    for k in range(len(shapes.COLOR_NAMES)):
      lab, n = scipy.ndimage.label(fg & (best == k), structure=eight)
      labels = np.where(lab > 0, lab + num, labels)
      num += n
  if num == 0:
    return []
  counts = np.bincount(labels.ravel())[1:]
  min_area = 0.25 * min(_AREA_FACTOR) * (shapes.SIZE_FRACTIONS[0] * res) ** 2
  order = [int(i) + 1 for i in np.argsort(-counts) if counts[i] >= min_area]
  size_threshold = np.sqrt(shapes.SIZE_FRACTIONS[0] * shapes.SIZE_FRACTIONS[1]) * res
  cells = np.asarray(shapes.POSITION_CENTERS, np.float32) * res
  supersample = 4 if res <= 64 else 2  # templates at 2x suffice for big shapes, 4x faster
  out = []
  for lab in order:
    if len(out) == max_objects:
      break
    core = labels == lab
    region = scipy.ndimage.binary_dilation(core, structure=eight)
    region &= (labels == 0) | core  # the rim, but not another shape's pixels
    color = int(
        np.argmax(
            np.bincount(
                best[core], weights=alpha[core, best[core]], minlength=len(shapes.COLOR_NAMES)
            )
        )
    )
    a = np.where(region, alpha[..., color], 0.0)
    area = float(a.sum())
    ys, xs = np.nonzero(region)
    cx = float((a[ys, xs] * (xs + 0.5)).sum() / area)
    cy = float((a[ys, xs] * (ys + 0.5)).sum() / area)
    margin = max(3, int(0.1 * res))
    y0, y1 = max(ys.min() - margin, 0), min(ys.max() + margin + 1, res)
    x0, x1 = max(xs.min() - margin, 0), min(xs.max() + margin + 1, res)
    window = a[y0:y1, x0:x1]
    best_kind, best_iou, best_box, best_center = 0, -1.0, 0.0, (cx, cy)
    for kind, factor in enumerate(_AREA_FACTOR):
      box = float(np.sqrt(area / factor))
      center = (cx, cy - box / 6.0) if kind == 2 else (cx, cy)
      template = shapes.shape_coverage(
          kind, center, box, y1 - y0, x1 - x0, origin_xy=(x0, y0), supersample=supersample
      )
      iou = _soft_iou(window, template)
      if iou > best_iou:
        best_kind, best_iou, best_box, best_center = kind, iou, box, center
    if background is not None and best_iou < MIN_IOU_OFF_BLACK:
      continue  # off black, a fragment of noise: it looks like no shape
    dist = np.sum((cells - np.asarray(best_center, np.float32)[None]) ** 2, axis=1)
    out.append(
        Detection(
            color=color,
            shape=best_kind,
            size=int(best_box > size_threshold),
            position=int(np.argmin(dist)),
            center_xy=best_center,
            box=best_box,
            area=area,
            iou=best_iou,
        )
    )
  return out


def _relation_holds(relation: int, first: Detection, second: Detection) -> bool:
  dx = second.center_xy[0] - first.center_xy[0]
  dy = second.center_xy[1] - first.center_xy[1]
  name = shapes.RELATION_NAMES[relation]
  if name == "above":  # first above second: second lower (larger y)
    return dy > abs(dx)
  if name == "below":
    return -dy > abs(dx)
  if name == "to the left of":
    return dx > abs(dy)
  if name == "to the right of":
    return -dx > abs(dy)
  raise ValueError(f"relation id {relation} is not one of 0..{len(shapes.RELATION_NAMES) - 1}")


def score_example(image: Any, attributes: dict, background: Background = None) -> dict[str, float]:
  """Scores one image against attributes (`shapes.attributes_from_example` or
  `parse_caption`): {'color', 'shape', 'size', 'position', 'count', 'exact'} in [0, 1];
  `background` as in `background_color` (None: black)."""
  n = int(attributes["num_objects"])
  if n not in (1, 2):
    raise ValueError(f"num_objects must be 1 or 2, got {n}")
  expected = [
      {k: int(attributes[k][i]) for k in ("color", "shape", "size", "position")} for i in range(n)
  ]
  found = detect(image, background=background)
  # Match caption objects to detections (injective), maximising attribute agreement; a
  # caption object left without a detection scores 0 on every attribute.
  best_match, best_key = [None] * n, (-1, 0.0)
  for k in range(min(n, len(found)), -1, -1):
    for objs in itertools.permutations(range(n), k):
      for dets in itertools.permutations(range(len(found)), k):
        agree = sum(
            (found[d].color == expected[o]["color"])
            + (found[d].shape == expected[o]["shape"])
            + (found[d].size == expected[o]["size"])
            for o, d in zip(objs, dets)
        )
        key = (agree, sum(found[d].area for d in dets))
        if key > best_key:
          best_key = key
          best_match = [None] * n
          for o, d in zip(objs, dets):
            best_match[o] = found[d]
  scores = {}
  for attr in ("color", "shape", "size"):
    scores[attr] = float(
        np.mean(
            [m is not None and getattr(m, attr) == e[attr] for m, e in zip(best_match, expected)]
        )
    )
  if n == 1:
    scores["position"] = float(
        best_match[0] is not None and best_match[0].position == expected[0]["position"]
    )
  else:
    scores["position"] = float(
        best_match[0] is not None
        and best_match[1] is not None
        and _relation_holds(int(attributes["relation"]), best_match[0], best_match[1])
    )
  scores["count"] = float(len(found) == n)
  scores["exact"] = float(all(scores[a] == 1.0 for a in ATTRIBUTES[:5]))
  return scores


def score_images(
    images: Sequence[Any] | np.ndarray,
    attributes: Sequence[dict],
    held_out: Sequence[bool] | None = None,
    background: Background = None,
) -> dict[str, Any]:
  """Scores a set of images. Returns {'mean': {attr: float}, 'per_example': [...], 'num'}
  plus 'held_out' / 'seen' means when `held_out` flags are given (results on colour+kind
  combinations never seen in training, reported separately). `background` as in
  `background_color` (None: black; "border" for grey or textured shapes data)."""
  if len(images) != len(attributes):
    raise ValueError(f"{len(images)} images but {len(attributes)} attribute sets")
  per = [score_example(img, attr, background) for img, attr in zip(images, attributes)]
  mean = lambda rows: {
      a: float(np.mean([r[a] for r in rows])) if rows else float("nan")  # noqa: E731
      for a in ATTRIBUTES
  }
  out = {"num": len(per), "mean": mean(per), "per_example": per}
  if held_out is not None:
    flags = [bool(f) for f in held_out]
    out["held_out"] = mean([r for r, f in zip(per, flags) if f])
    out["seen"] = mean([r for r, f in zip(per, flags) if not f])
    out["num_held_out"] = int(sum(flags))
  return out


_OBJ = r"a (small|large) (\w+) (circle|square|triangle)"
_ONE = re.compile(rf"^{_OBJ} (in the center|on the left|on the right|at the top|at the bottom)$")
_TWO = re.compile(rf"^{_OBJ} (above|below|to the left of|to the right of) {_OBJ}$")


def parse_caption(caption: str | bytes) -> dict:
  """A shapes caption -> attributes (the inverse of `shapes.caption_for`)."""
  if isinstance(caption, bytes):
    caption = caption.decode("utf-8")
  text = caption.strip().lower()

  def obj(size, color, kind, position):
    if color not in shapes.COLOR_NAMES:
      raise ValueError(f"colour {color!r} in {caption!r} is not one of {shapes.COLOR_NAMES}")
    return (
        shapes.SIZE_NAMES.index(size),
        shapes.COLOR_NAMES.index(color),
        shapes.SHAPE_NAMES.index(kind),
        position,
    )

  if m := _ONE.match(text):
    objs = [obj(*m.groups()[:3], shapes.POSITION_PHRASES.index(m.group(4)))]
    relation = -1
  elif m := _TWO.match(text):
    relation = shapes.RELATION_NAMES.index(m.group(4))
    p0, p1 = shapes.RELATION_POSITIONS[relation]
    objs = [obj(*m.groups()[:3], p0), obj(*m.groups()[4:7], p1)]
  else:
    raise ValueError(f"caption {caption!r} is not in the shapes grammar")
  return {
      "num_objects": len(objs),
      "size": [o[0] for o in objs],
      "color": [o[1] for o in objs],
      "shape": [o[2] for o in objs],
      "position": [o[3] for o in objs],
      "relation": relation,
  }
