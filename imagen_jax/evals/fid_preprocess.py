"""How uint8 images become InceptionV3 input: three named conventions, never mixed silently.

FID numbers move by several points with the resize filter alone (Parmar et al. 2022, "On Aliased
Resizing and Surprising Subtleties in GAN Evaluation"); Imagen App. C asks to document it. Every
statistics file records its mode and `frechet.fid_from_statistics` refuses to compare two modes.

Input: uint8 `[N, H, W, 3]` in [0, 255]. Output: float32 `[N, 299, 299, 3]`.

* `tf` (default) -- what TTUR's original `fid.py` feeds the 2015-12-05 graph, whose first ops are
  TF1 `ResizeBilinear(align_corners=False)` and `(x - 128) / 128`. TF1's legacy bilinear has *no*
  half-pixel offset: output pixel i samples the input at `src = i * in / out`,
  `x0 = floor(src)`, `x1 = min(x0 + 1, in - 1)`, `y = (1 - f) x[x0] + f x[x1]`, `f = src - x0`.
  (It shifts the image by half a pixel; reproducing the reference numbers needs the shift.)
* `pytorch_fid` -- pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`:
  images / 255, `F.interpolate(size=299, mode="bilinear", align_corners=False)`, i.e. half-pixel
  centres `src = (i + 0.5) * in / out - 0.5` clamped at 0 below, no antialiasing; then `2x - 1`.
* `clean` -- clean-fid's "clean" mode: each channel as a float32 PIL image ('F' mode), resized by
  PIL's BICUBIC (which antialiases when shrinking), clipped to [0, 255], then `(x - 128) / 128`.
  This runs on the host (PIL), the other two on the device.

On 299x299 input all three resizes are the identity; only the scaling differs
(`(x - 128) / 128` vs `x / 127.5 - 1`, a 0.4% difference in scale).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from imagen_jax.evals.inception import INCEPTION_SIZE

MODES = ("tf", "pytorch_fid", "clean")
DEFAULT_MODE = "tf"


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"unknown FID preprocessing mode {mode!r}; allowed: {MODES}")
  return mode


def check_images(images: np.ndarray) -> np.ndarray:
  """Validate uint8 `[N, H, W, 3]` (the only input the FID pipeline accepts)."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(
        f"FID expects uint8 images in [0, 255], got dtype {images.dtype}; "
        "convert model samples with `imagen_jax.images.to_uint8`"
    )
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"FID expects images [N, H, W, 3], got shape {images.shape}")
  return images


def bilinear_matrix(n_in: int, n_out: int, half_pixel: bool) -> np.ndarray:
  """`R [n_out, n_in]` with `y = R @ x` the 1-D bilinear resize (TF1 legacy or half-pixel).

  Bilinear resize is separable, so an image resizes as `R_h @ X @ R_w^T` per channel; as dense
  matmuls it runs well on any accelerator and is exact up to float rounding.
  """
  scale = n_in / n_out
  i = np.arange(n_out, dtype=np.float64)
  src = (i + 0.5) * scale - 0.5 if half_pixel else i * scale
  src = np.maximum(src, 0.0)  # torch clamps negative source coordinates to 0
  x0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  x1 = np.minimum(x0 + 1, n_in - 1)
  frac = src - x0
  r = np.zeros((n_out, n_in), np.float64)
  np.add.at(r, (np.arange(n_out), x0), 1.0 - frac)
  np.add.at(r, (np.arange(n_out), x1), frac)
  return r.astype(np.float32)


def _resize_bilinear(x: jax.Array, half_pixel: bool, size: int) -> jax.Array:
  """x float32 [N, H, W, C] -> [N, size, size, C] via the separable matrices."""
  rh = jnp.asarray(bilinear_matrix(x.shape[1], size, half_pixel))
  rw = jnp.asarray(bilinear_matrix(x.shape[2], size, half_pixel))
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,nhwc->nowc", rh, x, precision=hi)
  return jnp.einsum("pw,nowc->nopc", rw, x, precision=hi)


def device_preprocess(images: jax.Array, mode: str, size: int = INCEPTION_SIZE) -> jax.Array:
  """Jittable part: for `tf`/`pytorch_fid`, uint8 [N,H,W,3] -> resized, scaled float32.

  For `clean`, `images` is the float32 output of `host_preprocess` (already resized, in
  [0, 255]) and only the scaling happens here.
  """
  x = images.astype(jnp.float32)
  if mode == "tf":
    return (_resize_bilinear(x, False, size) - 128.0) / 128.0
  if mode == "pytorch_fid":
    return 2.0 * _resize_bilinear(x / 255.0, True, size) - 1.0
  if mode == "clean":
    if x.shape[1:3] != (size, size):
      raise ValueError(f"clean mode: run host_preprocess first (got {x.shape})")
    return (x - 128.0) / 128.0
  raise ValueError(f"unknown FID preprocessing mode {mode!r}; allowed: {MODES}")


def clean_resize(images: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
  """clean-fid's resize: uint8 [N,H,W,3] -> float32 [N,size,size,3] in [0, 255] (PIL, host)."""
  images = check_images(images)
  n, h, w, c = images.shape
  out = np.empty((n, size, size, c), np.float32)
  for i in range(n):
    for ch in range(c):
      # A float32 2-D array becomes a mode 'F' image: PIL filters it in float, no rounding.
      im = Image.fromarray(images[i, :, :, ch].astype(np.float32))
      out[i, :, :, ch] = np.asarray(im.resize((size, size), resample=Image.BICUBIC))
  return np.clip(out, 0.0, 255.0)


def host_preprocess(images: np.ndarray, mode: str, size: int = INCEPTION_SIZE) -> np.ndarray:
  """Host part: `clean` resizes with PIL here; the other modes pass uint8 through unchanged."""
  check_mode(mode)
  images = check_images(images)
  return clean_resize(images, size) if mode == "clean" else images


def preprocess(
    images: np.ndarray, mode: str = DEFAULT_MODE, size: int = INCEPTION_SIZE
) -> jax.Array:
  """Whole pipeline, uint8 `[N, H, W, 3]` -> float32 `[N, size, size, 3]` network input."""
  return device_preprocess(jnp.asarray(host_preprocess(images, mode, size)), mode, size)
