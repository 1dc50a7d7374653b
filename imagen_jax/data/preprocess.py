"""Per-stage preprocessing of one example: resize, crop, low-res derivation, caption choice.

Stages (Imagen §2.4, §4.1):
- base (e.g. 64): resize the shorter side to `image_size`, crop a square -> `image`.
- super-resolution (e.g. 64 -> 256): as base, then the conditioning input `lowres` is the
  anti-aliased downsample of that crop to `lowres_size` (quantised to uint8 like a real
  low-res image). The train step upsamples and noise-augments it; not done here.
- SR1024 crop training (App. F.3): the 1024 image and its 256 downsample are cropped at the same
  place to a `sr_crop_size` (256) crop and its aligned 64 crop, so the network trains on
  64 -> 256 crops and runs fully convolutionally on 256 -> 1024 at inference.

Images leave here as float32 in [-1, 1] ([H, W, 3]); all resampling is done on uint8 with PIL
(whose downscaling filters are anti-aliased: the kernel support grows with the scale factor).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain.python as grain
import numpy as np
import PIL.Image

RESAMPLE = {
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "box": PIL.Image.Resampling.BOX,
}
CROP_MODES = ("center", "random")


def _resample(name: str):
  if name not in RESAMPLE:
    raise ValueError(f"resample {name!r} is not one of {sorted(RESAMPLE)}")
  return RESAMPLE[name]


def to_rgb_uint8(image: Any) -> np.ndarray:
  """Any decoded image ([H, W], [H, W, 1|3|4], uint8 or PIL) -> uint8 [H, W, 3]."""
  if isinstance(image, PIL.Image.Image):
    return np.asarray(image.convert("RGB"))
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got dtype {image.dtype} shape {image.shape}")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected [H, W, 1|3|4], got shape {image.shape}")
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image[..., :3]


def resize(image: np.ndarray, height: int, width: int, resample: str = "bicubic") -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [height, width, 3]; anti-aliased when shrinking; no-op if equal."""
  if image.shape[:2] == (height, width):
    return image
  pil = PIL.Image.fromarray(image).resize((width, height), _resample(resample))
  return np.asarray(pil)


def resize_shorter_side(image: np.ndarray, size: int, resample: str = "bicubic") -> np.ndarray:
  """Scales uint8 [H, W, 3] so that min(H, W) == size, keeping the aspect ratio."""
  h, w = image.shape[:2]
  if min(h, w) == size:
    return image
  scale = size / min(h, w)
  # max(size, ...) guards the rounding of the longer side below the crop size.
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  return resize(image, nh, nw, resample)


def crop_offset(
    shape: Sequence[int], size: int, mode: str, rng: np.random.Generator | None
) -> tuple[int, int]:
  """(top, left) of a `size` x `size` crop of an [H, W, ...] array; random needs `rng`."""
  h, w = shape[0], shape[1]
  if h < size or w < size:
    raise ValueError(f"cannot crop {size}x{size} from an image of {h}x{w}")
  if mode == "center":
    return (h - size) // 2, (w - size) // 2
  if mode == "random":
    if rng is None:
      raise ValueError("crop mode 'random' needs an rng")
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
  raise ValueError(f"crop mode {mode!r} is not one of {CROP_MODES}")


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1]."""
  return image.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def select_caption(value: Any, rng: np.random.Generator | None) -> str:
  """A caption feature -> str. Several captions (e.g. COCO's five): one at random with `rng`,
  else the first. Bytes are decoded as UTF-8."""
  if isinstance(value, dict):
    raise ValueError(
        f"caption feature is a dict with keys {sorted(value)}; name the text field with a "
        "'/' path in caption_key, e.g. 'captions/text'"
    )
  if isinstance(value, (list, tuple, np.ndarray)) and not (
      isinstance(value, np.ndarray) and value.ndim == 0
  ):
    values = list(value)
    if not values:
      return ""
    value = values[int(rng.integers(len(values)))] if rng is not None else values[0]
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return str(value)


def get_feature(example: dict, key: str) -> Any:
  """Reads `key` from a (nested) example dict; '/' separates levels ('captions/text')."""
  value: Any = example
  for part in key.split("/"):
    if not isinstance(value, dict) or part not in value:
      have = sorted(value) if isinstance(value, dict) else type(value).__name__
      raise KeyError(f"feature {key!r} not found (at {part!r}; available: {have})")
    value = value[part]
  return value


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """What one cascade stage trains on.

  image_size: side of `image` (the stage's output resolution, e.g. 64, 256, 1024).
  lowres_size: side of `lowres` (the stage's input resolution), None for the base stage.
  crop: 'center' or 'random' (for the square crop after resizing the shorter side).
  sr_crop_size: 0 = off; else train on aligned crops (App. F.3): `image` is
    [sr_crop_size]^2 and `lowres` [sr_crop_size * lowres_size / image_size]^2.
  resample / lowres_resample: PIL filters for resizing / deriving the low-res image.
  """

  image_size: int
  lowres_size: int | None = None
  crop: str = "center"
  sr_crop_size: int = 0
  resample: str = "bicubic"
  lowres_resample: str = "bicubic"

  def __post_init__(self):
    if self.image_size <= 0:
      raise ValueError(f"image_size must be positive, got {self.image_size}")
    if self.crop not in CROP_MODES:
      raise ValueError(f"crop {self.crop!r} is not one of {CROP_MODES}")
    _resample(self.resample)
    _resample(self.lowres_resample)
    if self.lowres_size is not None:
      if not 0 < self.lowres_size < self.image_size or self.image_size % self.lowres_size:
        raise ValueError(
            f"lowres_size {self.lowres_size} must divide image_size {self.image_size} "
            "and be smaller"
        )
    if self.sr_crop_size:
      if self.lowres_size is None:
        raise ValueError("sr_crop_size needs lowres_size (it is an SR-stage option)")
      factor = self.image_size // self.lowres_size
      if not 0 < self.sr_crop_size <= self.image_size or self.sr_crop_size % factor:
        raise ValueError(
            f"sr_crop_size {self.sr_crop_size} must be in (0, {self.image_size}] and a "
            f"multiple of the SR factor {factor}"
        )

  @property
  def output_image_size(self) -> int:
    return self.sr_crop_size or self.image_size

  @property
  def output_lowres_size(self) -> int | None:
    if self.lowres_size is None:
      return None
    if self.sr_crop_size:
      return self.sr_crop_size * self.lowres_size // self.image_size
    return self.lowres_size


def preprocess_image(
    image: Any, spec: StageSpec, rng: np.random.Generator | None
) -> dict[str, np.ndarray]:
  """One decoded image -> {'image': f32 [S, S, 3], 'lowres': f32 [s, s, 3] (SR only)}."""
  img = to_rgb_uint8(image)
  img = resize_shorter_side(img, spec.image_size, spec.resample)
  top, left = crop_offset(img.shape, spec.image_size, spec.crop, rng)
  img = img[top : top + spec.image_size, left : left + spec.image_size]
  out = {}
  if spec.lowres_size is None:
    out["image"] = to_float(img)
    return out
  low = resize(img, spec.lowres_size, spec.lowres_size, spec.lowres_resample)
  if spec.sr_crop_size:
    # Crop the low-res first and take the high-res crop at the aligned place, so that the
    # pair is exact (the low-res crop is a crop of the downsampled whole image, as at
    # inference, not a downsample of the crop).
    factor = spec.image_size // spec.lowres_size
    lsize = spec.sr_crop_size // factor
    ltop, lleft = crop_offset(low.shape, lsize, "random" if rng is not None else "center", rng)
    low = low[ltop : ltop + lsize, lleft : lleft + lsize]
    img = img[ltop * factor : (ltop + lsize) * factor, lleft * factor : (lleft + lsize) * factor]
  out["image"] = to_float(img)
  out["lowres"] = to_float(low)
  return out


class StagePreprocess(grain.RandomMapTransform):
  """grain transform: raw TFDS example -> {'image', ['lowres'], 'caption' (str)}.

  The rng is grain's per-record generator (seeded from the loader seed and the record
  index), so random crops and caption choices are reproducible and survive a restore.
  """

  def __init__(
      self,
      spec: StageSpec,
      *,
      image_key: str = "image",
      caption_key: str | None = "caption",
      random_caption: bool = True,
      extra_keys: Sequence[str] = (),
  ):
    self.spec = spec
    self.image_key = image_key
    self.caption_key = caption_key
    self.random_caption = random_caption
    self.extra_keys = tuple(extra_keys)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    crop_rng = rng if (self.spec.crop == "random" or self.spec.sr_crop_size) else None
    out = preprocess_image(get_feature(element, self.image_key), self.spec, crop_rng)
    if self.caption_key:
      out["caption"] = select_caption(
          get_feature(element, self.caption_key), rng if self.random_caption else None
      )
    for key in self.extra_keys:  # e.g. shapes attributes for evaluation
      out[key.replace("/", "_")] = np.asarray(get_feature(element, key))
    return out


class TextFromCaptions(grain.MapTransform):
  """Batch-level: 'caption' [b] str -> 'text_ids' int32 [b, L] + 'text_mask' bool [b, L]
  (with `tokenizer`), or 'text_emb' float32 [b, L, D] + 'text_mask' (with `lookup`, e.g. a
  cache of precomputed encoder outputs). Drops 'caption' unless `keep_caption`."""

  def __init__(
      self,
      *,
      tokenizer=None,
      lookup=None,
      keep_caption: bool = False,
      lookup_id_key: str | None = None,
      keep_ids: bool = False,
  ):
    """lookup_id_key: batch field whose values (instead of the captions) are passed to
    `lookup`, e.g. example ids for `imagen_jax.text.cache.TextEmbeddingCache.get_batch`;
    the field is removed from the batch afterwards unless `keep_ids`."""
    if (tokenizer is None) == (lookup is None):
      raise ValueError("give exactly one of tokenizer and lookup")
    self.tokenizer = tokenizer
    self.lookup = lookup
    self.keep_caption = keep_caption
    self.lookup_id_key = lookup_id_key
    self.keep_ids = keep_ids

  def map(self, batch: dict) -> dict:
    batch = dict(batch)
    captions = [str(c) for c in np.asarray(batch["caption"]).reshape(-1)]
    if self.tokenizer is not None:
      ids, mask = self.tokenizer(captions)
      batch["text_ids"] = np.asarray(ids, np.int32)
    else:
      keys = captions
      if self.lookup_id_key:
        raw = np.asarray(batch[self.lookup_id_key]).reshape(-1)
        if not self.keep_ids:
          del batch[self.lookup_id_key]
        keys = [v.decode("utf-8") if isinstance(v, bytes) else v.item() for v in raw]
      emb, mask = self.lookup(keys)
      batch["text_emb"] = np.asarray(emb, np.float32)
    batch["text_mask"] = np.asarray(mask, bool)
    if batch["text_mask"].shape[0] != len(captions):
      raise ValueError(
          f"text function returned {batch['text_mask'].shape[0]} rows for "
          f"{len(captions)} captions"
      )
    if not self.keep_caption:
      del batch["caption"]
    return batch
