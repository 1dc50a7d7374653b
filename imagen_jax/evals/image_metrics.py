"""Pixel-level image metrics on uint8 images `[N, H, W, 3]` (for the super-resolution stage).

Imagen reports FID and CLIP score only; these two measure what an SR stage (§2.4, §2.5) should
do on real low-res inputs: reproduce the real image (PSNR) and restore steep edges where
bicubic upsampling blurs them (edge sharpness).
"""

from __future__ import annotations

import numpy as np

# ITU-R BT.601 luma weights.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _check(images, name: str) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{name} wants uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
  return images


def psnr(a_u8, b_u8) -> float:
  """Mean over images of `10 log10(255^2 / MSE)` in dB (MSE floored at 1e-10: identical images
  give 148.1 dB, not inf). a, b: uint8 `[N, H, W, 3]` of one shape."""
  a, b = _check(a_u8, "psnr"), _check(b_u8, "psnr")
  if a.shape != b.shape:
    raise ValueError(f"psnr wants two batches of one shape, got {a.shape} and {b.shape}")
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def edge_sharpness(images_u8) -> float:
  """99th percentile of the image-gradient magnitude (forward differences of luma, 0-255 scale).

  The mean gradient does not separate sharp from blurred edges on mostly flat images (the
  shapes data's backgrounds); the top percentile measures how steep the edges are.
  """
  x = _check(images_u8, "edge_sharpness").astype(np.float32) @ _LUMA
  gx = x[:, :, 1:] - x[:, :, :-1]
  gy = x[:, 1:, :] - x[:, :-1, :]
  mag = np.sqrt(gx[:, :-1, :] ** 2 + gy[:, :, :-1] ** 2)
  return float(np.percentile(mag, 99))
