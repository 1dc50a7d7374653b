"""The offline `shapes` dataset: procedurally drawn coloured shapes with captions.

A TFDS `GeneratorBasedBuilder` (array_record files, readable with `tfds.data_source` and no
TensorFlow). Each image holds one or two anti-aliased shapes on a background (`BACKGROUNDS`:
black by default, or mid-grey, or mid-grey with a faint texture); the caption
comes from a small grammar and the structured attributes behind it are stored beside it, so that
`imagen_jax.evals.shapes_metric` can score generated images exactly.

Design (kept small so that a tiny CPU-trained cascade learns it in minutes):
- colours: red, yellow, green, cyan, blue, purple (hues ~30 degrees or more apart; on a black
  background every anti-aliased edge pixel is a scaled palette colour, so the metric can
  recover the colour exactly by projecting onto the palette lines).
- kinds: circle, square, triangle (axis-aligned, apex up). Sizes: small / large (bounding box
  0.24 / 0.38 of the image side).
- one object: placed at one of five cells (center, left, right, top, bottom);
  caption "a small green triangle on the left".
- two objects: relation above / below / to the left of / to the right of, placed in the two
  opposite cells; caption "a large red circle above a small blue square".
- held-out combinations: the colour+kind pairs in `HELD_OUT_PAIRS` never appear in `train`;
  about half of the `test` examples contain one (feature `held_out` = True), so results on
  never-seen combinations can be reported separately.

Rendering: coverage of each shape is computed on a 4x supersampled grid and box-averaged
(the same anti-aliasing as drawing at 4x and box-downsampling), then alpha-composited.
Every example is a pure function of (seed, split, index, background), so builds are
reproducible.

Backgrounds (a config of the dataset, `data.shapes_background`; each its own directory):
- black (default): every background pixel sits at the lower pixel bound (-1 in [-1, 1]).
- grey: uniform mid-grey (128, i.e. ~0 in [-1, 1]), far from both bounds, so that sampling
  artefacts at the bounds (static thresholding's clipping at high guidance weights, Imagen §2.3)
  show, and dynamic thresholding's rescaling does not move a background that sits at a bound.
- texture: mid-grey plus a low-amplitude deterministic grey pattern
  (128 + 16 sin(8 pi u) sin(8 pi v), u, v in [0, 1] across the image), a less flat world.
Shapes are alpha-composited on the background, so each pixel is bg (1 - alpha) + alpha colour.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from imagen_jax.text import cache as text_cache
from imagen_jax.text import registry

COLOR_NAMES = ("red", "yellow", "green", "cyan", "blue", "purple")
PALETTE = np.array(
    [
        (230, 40, 40),
        (235, 215, 30),
        (40, 190, 50),
        (30, 210, 210),
        (40, 70, 240),
        (180, 50, 220),
    ],
    dtype=np.float32,
)
BACKGROUND = np.zeros(3, np.float32)  # black: blends with it keep each colour's direction
BACKGROUNDS = ("black", "grey", "texture")
GREY_LEVEL = 128.0
TEXTURE_AMPLITUDE = 16.0  # pixel levels; well inside [0, 255] and below any palette contrast
TEXTURE_PERIODS = 4  # pattern periods across the image side
SHAPE_NAMES = ("circle", "square", "triangle")
SIZE_NAMES = ("small", "large")
# Bounding-box side of a shape as a fraction of the image side, per size id.
SIZE_FRACTIONS = (0.24, 0.38)
POSITION_NAMES = ("center", "left", "right", "top", "bottom")
POSITION_PHRASES = ("in the center", "on the left", "on the right", "at the top", "at the bottom")
# Cell centres (x, y) as fractions of the image side, per position id.
POSITION_CENTERS = ((0.5, 0.5), (0.26, 0.5), (0.74, 0.5), (0.5, 0.26), (0.5, 0.74))
RELATION_NAMES = ("above", "below", "to the left of", "to the right of")
# (position of the first object, position of the second object) per relation id.
RELATION_POSITIONS = ((3, 4), (4, 3), (1, 2), (2, 1))
# (colour id, shape id) pairs that never appear in train: red triangle, green square,
# blue circle. Every colour and every kind still appears in train with the other kinds.
HELD_OUT_PAIRS = frozenset({(0, 2), (2, 1), (4, 0)})
SUPERSAMPLE = 4
MAX_OBJECTS = 2
_SPLIT_IDS = {"train": 0, "test": 1}


def shape_coverage(
    kind: int,
    center_xy: tuple[float, float],
    box: float,
    height: int,
    width: int,
    *,
    supersample: int = SUPERSAMPLE,
    origin_xy: tuple[int, int] = (0, 0),
) -> np.ndarray:
  """Anti-aliased coverage in [0, 1] of one shape on a pixel grid.

  Args:
    kind: index into `SHAPE_NAMES`.
    center_xy: centre of the shape's bounding box, in pixels (pixel (i, j) spans
      [j, j+1] x [i, i+1]).
    box: side of the bounding box in pixels.
    height, width: size of the returned window.
    supersample: samples per pixel side (coverage = box average of the samples).
    origin_xy: pixel coordinates of the window's top-left corner (lets the metric render a
      template on a crop only).

  Returns:
    float32 [height, width].
  """
  s = supersample
  xs = origin_xy[0] + (np.arange(width * s, dtype=np.float32) + 0.5) / s
  ys = origin_xy[1] + (np.arange(height * s, dtype=np.float32) + 0.5) / s
  dx = xs[None, :] - center_xy[0]
  dy = ys[:, None] - center_xy[1]
  half = box / 2.0
  if kind == 0:  # circle of diameter `box`
    inside = dx * dx + dy * dy <= half * half
  elif kind == 1:  # axis-aligned square
    inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
  elif kind == 2:  # isosceles triangle, apex up, base = height = box
    # |dx| <= half * (dy + half) / box  for dy in [-half, half]
    inside = (dy <= half) & (np.abs(dx) * 2.0 <= dy + half)
  else:
    raise ValueError(f"shape kind {kind!r} is not one of 0..{len(SHAPE_NAMES) - 1} {SHAPE_NAMES}")
  return inside.reshape(height, s, width, s).mean(axis=(1, 3), dtype=np.float32)


def check_background(background: str) -> str:
  """Returns `background` when it names one of `BACKGROUNDS`; raises a ValueError otherwise."""
  if background not in BACKGROUNDS:
    raise ValueError(f"shapes background {background!r} is not one of {BACKGROUNDS}")
  return background


def background_image(background: str, resolution: int) -> np.ndarray:
  """The background before any shape, float32 [R, R, 3] in [0, 255] (see the module docstring).

  texture: 128 + A sin(2 pi P u) sin(2 pi P v) on every channel, u = (j + 0.5) / R and
  v = (i + 0.5) / R, A = `TEXTURE_AMPLITUDE`, P = `TEXTURE_PERIODS` (the same pattern at
  every resolution).
  """
  check_background(background)
  if background == "black":
    return np.broadcast_to(BACKGROUND, (resolution, resolution, 3)).astype(np.float32)
  image = np.full((resolution, resolution, 3), GREY_LEVEL, np.float32)
  if background == "texture":
    u = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    wave = np.sin(2.0 * np.pi * TEXTURE_PERIODS * u)
    image += TEXTURE_AMPLITUDE * (wave[:, None] * wave[None, :])[..., None]
  return image


def render(objects: list[dict], resolution: int, background: str = "black") -> np.ndarray:
  """Draws objects (dicts with `color`, `shape`, `size`, `position` ids) -> uint8 [R, R, 3]
  on `background` (one of `BACKGROUNDS`): pixel = bg (1 - alpha) + alpha colour per shape."""
  image = background_image(background, resolution)
  for obj in objects:
    cx, cy = POSITION_CENTERS[obj["position"]]
    cx, cy, box = cx * resolution, cy * resolution, SIZE_FRACTIONS[obj["size"]] * resolution
    # Only the shape's bounding box (+1 pixel) can be covered: render that window alone
    # (at 1024 the full 4x grid would be 4096^2 per shape).
    x0, y0 = max(int(np.floor(cx - box / 2)) - 1, 0), max(int(np.floor(cy - box / 2)) - 1, 0)
    x1 = min(int(np.ceil(cx + box / 2)) + 1, resolution)
    y1 = min(int(np.ceil(cy + box / 2)) + 1, resolution)
    alpha = shape_coverage(obj["shape"], (cx, cy), box, y1 - y0, x1 - x0, origin_xy=(x0, y0))
    win = image[y0:y1, x0:x1]
    image[y0:y1, x0:x1] = win * (1.0 - alpha[..., None]) + PALETTE[obj["color"]] * alpha[..., None]
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def object_phrase(obj: dict) -> str:
  return f"a {SIZE_NAMES[obj['size']]} {COLOR_NAMES[obj['color']]} {SHAPE_NAMES[obj['shape']]}"


def caption_for(objects: list[dict], relation: int) -> str:
  """The grammar: one object + position phrase, or two objects joined by a relation."""
  if len(objects) == 1:
    return f"{object_phrase(objects[0])} {POSITION_PHRASES[objects[0]['position']]}"
  if len(objects) == 2 and 0 <= relation < len(RELATION_NAMES):
    return f"{object_phrase(objects[0])} {RELATION_NAMES[relation]} {object_phrase(objects[1])}"
  raise ValueError(
      f"need 1 object, or 2 with a relation id in 0..3; got {len(objects)}, {relation}"
  )


def sample_scene(rng: np.random.Generator, *, held_out: bool | None) -> tuple[list[dict], int]:
  """Draws (objects, relation id; -1 for one object).

  held_out=False: no object uses a pair from `HELD_OUT_PAIRS` (train distribution).
  held_out=True: at least one object does. None: unconstrained.
  """
  while True:  # rejection sampling; acceptance is >= 1/6, so this ends fast
    num = int(rng.integers(1, MAX_OBJECTS + 1))
    if num == 1:
      relation = -1
      positions = [int(rng.integers(len(POSITION_NAMES)))]
    else:
      relation = int(rng.integers(len(RELATION_NAMES)))
      positions = list(RELATION_POSITIONS[relation])
    objects = []
    for pos in positions:
      objects.append(
          dict(
              color=int(rng.integers(len(COLOR_NAMES))),
              shape=int(rng.integers(len(SHAPE_NAMES))),
              size=int(rng.integers(len(SIZE_NAMES))),
              position=pos,
          )
      )
    if num == 2 and (objects[0]["color"], objects[0]["shape"]) == (
        objects[1]["color"],
        objects[1]["shape"],
    ):
      continue  # two identical-looking objects make the caption ambiguous for the metric
    has_held = any((o["color"], o["shape"]) in HELD_OUT_PAIRS for o in objects)
    if held_out is None or has_held == held_out:
      return objects, relation


def scene(seed: int, split: str, index: int) -> tuple[list[dict], int, bool]:
  """(objects, relation id, held_out) of example `index`: independent of the resolution, so
  every resolution of a split shows the same scenes under the same captions."""
  if split not in _SPLIT_IDS:
    raise ValueError(f"split {split!r} is not one of {sorted(_SPLIT_IDS)}")
  rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
  if split == "train":
    held = False
  else:  # half the test examples contain a never-seen colour+kind pair
    held = bool(rng.random() < 0.5)
  objects, relation = sample_scene(rng, held_out=held)
  return objects, relation, held


def captions(seed: int, split: str, num: int) -> list[str]:
  """The captions of examples 0..num-1 of a split, without rendering (e.g. to precompute
  their text embeddings once)."""
  return [caption_for(*scene(seed, split, i)[:2]) for i in range(num)]


def make_example(
    seed: int, split: str, index: int, resolution: int, background: str = "black"
) -> dict:
  """One example as a dict of features (image as a PIL image, for TFDS's PNG encoder)."""
  objects, relation, held = scene(seed, split, index)
  pad = MAX_OBJECTS - len(objects)
  field = lambda k: np.array([o[k] for o in objects] + [-1] * pad, np.int32)  # noqa: E731
  return {
      "image": PIL.Image.fromarray(render(objects, resolution, background)),
      "caption": caption_for(objects, relation),
      "num_objects": np.int32(len(objects)),
      "color": field("color"),
      "shape": field("shape"),
      "size": field("size"),
      "position": field("position"),
      "relation": np.int32(relation),
      "held_out": held,
      "index": np.int32(index),
  }


def attributes_from_example(example: dict) -> dict:
  """The scoring attributes of a decoded example (numpy values) as plain Python lists."""
  n = int(example["num_objects"])
  return {
      "num_objects": n,
      "color": [int(v) for v in np.asarray(example["color"])[:n]],
      "shape": [int(v) for v in np.asarray(example["shape"])[:n]],
      "size": [int(v) for v in np.asarray(example["size"])[:n]],
      "position": [int(v) for v in np.asarray(example["position"])[:n]],
      "relation": int(example["relation"]),
  }


def read_examples(
    builder: tfds.core.DatasetBuilder, split: str = "test", limit: int | None = None
) -> list[dict]:
  """Decoded examples of a built split in generation order (e.g. the demo's test prompts):
  dicts with 'image' uint8 [R, R, 3], 'caption' str, 'attributes' (for the metric),
  'held_out' bool, 'index' int."""
  source = builder.as_data_source()[split]
  rows = []
  for i in range(len(source)):
    ex = source[i]
    rows.append(
        {
            "image": ex["image"],
            "caption": ex["caption"].decode("utf-8"),
            "attributes": attributes_from_example(ex),
            "held_out": bool(ex["held_out"]),
            "index": int(ex["index"]),
        }
    )
  rows.sort(key=lambda r: r["index"])  # TFDS stores records shuffled by key
  return rows[:limit]


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """resolution: image side in pixels; num_train / num_test: split sizes; seed: base seed;
  background: one of `BACKGROUNDS`."""

  resolution: int = 64
  num_train: int = 20000
  num_test: int = 500
  seed: int = 0
  background: str = "black"


def config_name(
    resolution: int, num_train: int, num_test: int, seed: int, background: str = "black"
) -> str:
  """Default configs are `r{R}`; other sizes/seeds/backgrounds get their own name (own
  directory): a black dataset is never read as a grey one, nor the reverse."""
  bg = "" if check_background(background) == "black" else f"_{background}"
  if (num_train, num_test, seed) == (ShapesConfig.num_train, ShapesConfig.num_test, 0):
    return f"r{resolution}{bg}"
  return f"r{resolution}_train{num_train}_test{num_test}_seed{seed}{bg}"


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Procedural coloured shapes with captions and attributes (see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  BUILDER_CONFIGS = [
      ShapesConfig(name=f"r{r}", resolution=r, description=f"{r}x{r} images")
      for r in (32, 64, 128, 256, 1024)
  ]
  DEFAULT_CONFIG_NAME = "r64"

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    ids = lambda: tfds.features.Tensor(shape=(MAX_OBJECTS,), dtype=np.int32)  # noqa: E731
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "num_objects": np.int32,
                "color": ids(),  # index into COLOR_NAMES, -1 = no object
                "shape": ids(),  # index into SHAPE_NAMES
                "size": ids(),  # index into SIZE_NAMES
                "position": ids(),  # index into POSITION_NAMES
                "relation": np.int32,  # index into RELATION_NAMES, -1 for one object
                "held_out": np.bool_,  # contains a colour+kind pair never seen in train
                "index": np.int32,  # generation index (records are stored shuffled)
            }
        ),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the data is drawn
    cfg = self.builder_config
    return {
        "train": self._generate_examples("train", cfg.num_train),
        "test": self._generate_examples("test", cfg.num_test),
    }

  def _generate_examples(self, split: str, num: int) -> Iterator[tuple[int, dict]]:
    cfg = self.builder_config
    for i in range(num):
      yield i, make_example(cfg.seed, split, i, cfg.resolution, cfg.background)


def shapes_builder(
    data_dir: str | os.PathLike,
    resolution: int,
    *,
    num_train: int = ShapesConfig.num_train,
    num_test: int = ShapesConfig.num_test,
    seed: int = 0,
    background: str = "black",
) -> Shapes:
  """The builder for these settings (not built). Names the config after the settings."""
  if int(resolution) < 16:
    raise ValueError(f"resolution {resolution!r} is too small; use >= 16 (e.g. 32, 64, 256)")
  if num_train < 1 or num_test < 1:
    raise ValueError(f"num_train={num_train} and num_test={num_test} must both be >= 1")
  name = config_name(resolution, num_train, num_test, seed, background)
  if name in Shapes.builder_configs:  # a predefined config: pass its name (no TFDS warning)
    return Shapes(config=name, data_dir=os.fspath(data_dir), file_format="array_record")
  cfg = ShapesConfig(
      name=name,
      resolution=int(resolution),
      num_train=int(num_train),
      num_test=int(num_test),
      seed=int(seed),
      background=background,
      description=(
          f"{resolution}x{resolution} images, {num_train}/{num_test}, seed {seed}, "
          f"{background} background"
      ),
  )
  return Shapes(config=cfg, data_dir=os.fspath(data_dir), file_format="array_record")


def build_shapes(
    data_dir: str | os.PathLike,
    resolution: int,
    *,
    num_train: int = ShapesConfig.num_train,
    num_test: int = ShapesConfig.num_test,
    seed: int = 0,
    background: str = "black",
) -> Shapes:
  """Builds (or reuses, when already complete) the shapes dataset; returns the builder.

  TFDS writes into an `incomplete.*` directory and renames it on success, so an interrupted
  build is never read as a finished one; calling again rebuilds it.
  Read it with `builder.as_data_source()[split]` (no TensorFlow needed).
  """
  builder = shapes_builder(
      data_dir, resolution, num_train=num_train, num_test=num_test, seed=seed, background=background
  )
  builder.download_and_prepare()
  return builder


def build_from_config(data_config, data_dir: str | os.PathLike) -> Shapes:
  """`build_shapes` with a stage config's `data` block (resolution, sizes, seed, background):
  what the trainer's pipeline reads, so an application builds the same dataset."""
  d = data_config
  return build_shapes(
      data_dir,
      int(d.resolution),
      num_train=int(d.num_train),
      num_test=int(d.num_test),
      seed=int(d.shapes_seed),
      background=d.get("shapes_background", "black"),
  )


def build_text_cache(config, data_dir: str) -> str:
  """The text-embedding cache of a shapes stage's distinct training captions, keyed by the
  caption text (for `config.text.embedding_cache`); written once, reused while the encoder's
  weights are unchanged. Returns its directory, `<data_dir>/text_cache_<encoder>_L<len>_n<num>
  _seed<seed>`. Several processes may call it at once (e.g. every host of one run): one encodes,
  the others wait on the cache lock and reuse its cache (`text.cache.ensure_cache`).

  The text encoder is frozen (Imagen §2.1), so each caption is encoded once, not every step.
  """
  d, t = config.data, config.text
  if d.name != "shapes":
    raise ValueError(f"build_text_cache is for the shapes dataset, got data.name={d.name!r}")
  path = os.path.join(
      data_dir,
      f"text_cache_{t.name}_L{int(t.max_length)}_n{int(d.num_train)}_seed{int(d.shapes_seed)}",
  )
  wanted = captions(int(d.shapes_seed), "train", int(d.num_train))
  return text_cache.ensure_cache(registry.get_text_encoder(t), wanted, path)
