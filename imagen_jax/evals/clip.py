"""CLIP score of (image, caption) pairs with a local Hugging Face CLIP checkpoint, in JAX.

    scorer = CLIPScorer("/models/clip-vit-large-patch14")   # config.json, model.safetensors,
                                                            # tokenizer files, preprocessor_config.json
    res = scorer.score(images_uint8, captions)
    res.clip_score, res.mean_cosine, res.cosines            # 100*mean(max(cos,0)), mean cos, [N]

Definition (Radford et al. 2021 embeddings; Hessel et al. 2021 "CLIPScore"; Imagen §4.2 plots
CLIP score against FID-10K): for image embedding u and text embedding v (the projections),
cos_i = <u_i, v_i> / (|u_i| |v_i|). Reported:
  * `cosines` [N]: per-sample values (kept, so that subsets and bootstraps need no recompute);
  * `mean_cosine` = mean_i cos_i (the raw number some papers report, e.g. 0.27-0.32);
  * `clip_score` = 100 * mean_i max(cos_i, 0): torchmetrics' `CLIPScore` convention (it clips
    each sample at 0 and scales by 100; Hessel et al.'s CLIP-S uses w = 2.5 instead of 100).
Which CLIP model was used must be stated with every number; Imagen does not name one (NeMo's
reproduction uses ViT-L/14).

Image preprocessing follows the checkpoint's `preprocessor_config.json` as HF's
`CLIPImageProcessor` does (defaults: the OpenAI values): resize the shorter side to 224 with PIL
bicubic on the uint8 image (longer side `int(224 * long / short)`), centre crop 224x224
(offset `(size - crop) // 2`), scale to [0, 1], normalise with the checkpoint's mean/std
(OpenAI: mean (0.48145466, 0.4578275, 0.40821073), std (0.26862954, 0.26130258, 0.27577711)).
Captions: the checkpoint's tokenizer (transformers `CLIPTokenizerFast`/`CLIPTokenizer`, local
files only), padded/truncated to the text tower's `max_position_embeddings` (77).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from imagen_jax import paths
from imagen_jax.evals import batched, clip_model

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ImagePreprocessConfig:
  """What `CLIPImageProcessor` would do; from `preprocessor_config.json` or the OpenAI defaults."""

  shortest_edge: int | None = 224  # resize the shorter side to this ...
  resize_hw: tuple[int, int] | None = None  # ... or to exactly (h, w) when the config says so
  crop_hw: tuple[int, int] | None = (224, 224)
  resample: int = 3  # PIL.Image.BICUBIC
  mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  std: tuple[float, float, float] = OPENAI_CLIP_STD
  do_normalize: bool = True

  @classmethod
  def from_pretrained(cls, path: str) -> "ImagePreprocessConfig":
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.exists(file):
      return cls()
    with open(file) as f:
      d = json.load(f)
    size = d.get("size", {"shortest_edge": 224})
    shortest, resize_hw = None, None
    if isinstance(size, int):
      shortest = size
    elif "shortest_edge" in size:
      shortest = int(size["shortest_edge"])
    elif "height" in size and "width" in size:
      resize_hw = (int(size["height"]), int(size["width"]))
    else:
      raise ValueError(
          f"{file}: unsupported size {size!r} (allowed: int, "
          "{'shortest_edge': n} or {'height': h, 'width': w})"
      )
    crop = d.get("crop_size", 224)
    crop_hw = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
    if not d.get("do_resize", True):
      shortest, resize_hw = None, None
    return cls(
        shortest_edge=shortest,
        resize_hw=resize_hw,
        crop_hw=crop_hw if d.get("do_center_crop", True) else None,
        resample=int(d.get("resample", 3)),
        mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(d.get("image_std", OPENAI_CLIP_STD)),
        do_normalize=bool(d.get("do_normalize", True)),
    )


def preprocess_images(images: np.ndarray, cfg: ImagePreprocessConfig) -> np.ndarray:
  """uint8 `[N, H, W, 3]` -> float32 `[N, crop_h, crop_w, 3]` CLIP pixels (NHWC), on the host."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
        f"CLIP score expects uint8 images [N, H, W, 3], got {images.dtype} " f"{images.shape}"
    )
  out = []
  for img in images:
    h, w = img.shape[:2]
    if cfg.resize_hw is not None:
      new_h, new_w = cfg.resize_hw
    elif cfg.shortest_edge is not None:
      # HF get_resize_output_image_size(default_to_square=False): the longer side truncates.
      s = cfg.shortest_edge
      new_h, new_w = (int(s * h / w), s) if w <= h else (s, int(s * w / h))
    else:
      new_h, new_w = h, w
    if (new_h, new_w) != (h, w):
      img = np.asarray(Image.fromarray(img).resize((new_w, new_h), resample=cfg.resample))
    if cfg.crop_hw is not None:
      ch, cw = cfg.crop_hw
      if ch > img.shape[0] or cw > img.shape[1]:
        raise ValueError(f"image {img.shape[:2]} is smaller than the crop {cfg.crop_hw}")
      top, left = (img.shape[0] - ch) // 2, (img.shape[1] - cw) // 2
      img = img[top : top + ch, left : left + cw]
    x = img.astype(np.float32) / np.float32(255.0)
    if cfg.do_normalize:
      x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    out.append(x)
  return np.stack(out).astype(np.float32)


def load_tokenizer(path: str):
  """The checkpoint's own tokenizer from `path` (no network): fast if possible, else slow."""
  import transformers  # deferred: a 1.3 s import that only the CLIP tokenizer needs

  fast = getattr(transformers, "CLIPTokenizerFast", None)  # transformers 5 has only one class
  if fast is not None:
    try:
      return fast.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 -- e.g. no tokenizer.json and no converter: try slow
      pass
  return transformers.CLIPTokenizer.from_pretrained(path, local_files_only=True)


@dataclasses.dataclass(frozen=True)
class CLIPScoreResult:
  cosines: np.ndarray  # [N] float64 per-sample cosine similarity
  mean_cosine: float  # mean of cosines
  clip_score: float  # 100 * mean(max(cosines, 0)) (torchmetrics CLIPScore)


def summarize(cosines: np.ndarray) -> CLIPScoreResult:
  cosines = np.asarray(cosines, np.float64)
  return CLIPScoreResult(
      cosines, float(cosines.mean()), float(100.0 * np.maximum(cosines, 0.0).mean())
  )


class CLIPScorer:
  """A local HF CLIP checkpoint in Flax with its tokenizer and image preprocessing.

  Args:
    path: folder with `config.json`, `model.safetensors`, tokenizer files
      (`tokenizer.json` or `vocab.json` + `merges.txt`) and optionally
      `preprocessor_config.json`; a bucket folder (`gs://`) is read from its local copy
      (`paths.local_copy`).
    batch_size: pairs per network call (sharded over local devices when it divides).
    progress: show a tqdm bar.
  """

  def __init__(self, path: str, *, batch_size: int = 64, progress: bool = True):
    if paths.is_remote(path):
      path = paths.local_copy(path)
    if not os.path.isdir(path):
      raise ValueError(
          f"CLIP checkpoint folder {path!r} does not exist (no downloads: "
          "save a HF CLIP model there with save_pretrained(..., "
          "safe_serialization=True))"
      )
    self.path = path
    self.config = clip_model.CLIPConfig.from_pretrained(path)
    self.image_cfg = ImagePreprocessConfig.from_pretrained(path)
    self.tokenizer = load_tokenizer(path)
    params = clip_model.load_clip_params(os.path.join(path, "model.safetensors"), self.config)
    self.model = clip_model.CLIPModel(self.config)
    self.progress = progress
    model = self.model

    def embed(params, pixels, ids, mask):
      u = model.apply({"params": params}, pixels, method=model.get_image_features)
      v = model.apply({"params": params}, ids, mask, method=model.get_text_features)
      u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
      v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
      return jnp.stack([u, v], axis=1)  # [B, 2, P]

    self._runner = batched.BatchRunner(embed, params, batch_size)
    self.batch_size = batch_size

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """texts -> (ids int32 [N, 77], attention mask int32 [N, 77])."""
    if isinstance(texts, str):
      raise ValueError("texts must be a sequence of strings, got one str")
    tok = self.tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=self.config.text.max_position_embeddings,
        return_tensors="np",
    )
    return tok["input_ids"].astype(np.int32), tok["attention_mask"].astype(np.int32)

  def embeddings(self, images: np.ndarray, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image and text embeddings, each float32 `[N, projection_dim]`."""
    images = np.asarray(images)
    if len(texts) == 0:
      raise ValueError("CLIP score of zero pairs is undefined")
    if len(images) != len(texts):
      raise ValueError(
          f"{len(images)} images but {len(texts)} texts; CLIP score pairs " "image i with text i"
      )
    us, vs = [], []
    for a in tqdm(
        range(0, len(texts), self.batch_size), desc="CLIP score", disable=not self.progress
    ):
      b = min(a + self.batch_size, len(texts))
      pixels = preprocess_images(images[a:b], self.image_cfg)
      ids, mask = self.tokenize(texts[a:b])
      uv = self._runner(pixels, ids, mask)
      us.append(uv[:, 0])
      vs.append(uv[:, 1])
    return np.concatenate(us), np.concatenate(vs)

  def score(self, images: np.ndarray, texts: Sequence[str]) -> CLIPScoreResult:
    """Per-sample cosines, raw mean cosine and 100 * mean(max(cos, 0))."""
    u, v = self.embeddings(images, texts)
    return summarize(np.sum(u.astype(np.float64) * v.astype(np.float64), axis=-1))


def clip_score(
    images: np.ndarray, texts: Sequence[str], scorer: CLIPScorer | str
) -> CLIPScoreResult:
  """`CLIPScorer(path).score(images, texts)`; pass a scorer to reuse its compiled network."""
  if isinstance(scorer, str):
    scorer = CLIPScorer(scorer)
  return scorer.score(images, texts)
