"""The forward (noising) process and the SR stages' low-res conditioning (Imagen App. A, §2.4).

Images are ``[B, H, W, C]`` float32 in [-1, 1]; per-example scalars (``logsnr``, ``aug_level``)
are ``[B]`` and are reshaped explicitly to ``[B, 1, 1, 1]`` (the project runs with
``jax_numpy_rank_promotion="raise"``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.schedules import alpha_sigma

Array = jax.Array


def per_example(v: Array, x: Array) -> Array:
  """Reshape a per-example ``[B]`` array (or a scalar) to broadcast against ``x: [B, ...]``."""
  v = jnp.asarray(v, jnp.float32)
  if v.ndim == 0:
    return v
  if v.ndim != 1 or v.shape[0] != x.shape[0]:
    raise ValueError(
        f"expected a scalar or shape [{x.shape[0]}] (one value per example of an "
        f"array of shape {x.shape}), got shape {v.shape}"
    )
  return v.reshape(v.shape + (1,) * (x.ndim - 1))


def q_sample(x0: Array, logsnr: Array, noise: Array) -> Array:
  """Sample q(z_t | x0) = N(alpha_t x0, sigma_t^2 I) by reparameterisation (Imagen App. A).

      z_t = alpha_t x0 + sigma_t eps,   alpha_t^2 = sigmoid(logsnr), sigma_t^2 = sigmoid(-logsnr)

  Args:
    x0: clean images ``[B, H, W, C]``.
    logsnr: ``[B]`` (or a scalar, shared by the batch).
    noise: eps ~ N(0, I), same shape as ``x0``.
  Returns:
    z_t, float32 ``[B, H, W, C]``.
  """
  x0 = jnp.asarray(x0, jnp.float32)
  alpha, sigma = alpha_sigma(per_example(logsnr, x0))
  return alpha * x0 + sigma * jnp.asarray(noise, jnp.float32)


def upsample_lowres(lowres: Array, size: tuple[int, int], method: str = "bicubic") -> Array:
  """Resize the low-res conditioning image ``[B, h, w, C]`` to ``[B, H, W, C]`` (Imagen §2.4).

  The paper does not say which interpolation feeds the SR stages; we default to bicubic
  (``jax.image.resize``; a setting) and clip to [-1, 1] because cubic kernels overshoot and the
  network was trained on images in [-1, 1]. The same function must be used for training
  (low-res derived from the high-res image) and for sampling (low-res from the previous stage).

  Args:
    lowres: ``[B, h, w, C]`` in [-1, 1].
    size: ``(H, W)``, static Python ints.
    method: any ``jax.image.resize`` method ("nearest", "bilinear", "bicubic", "lanczos3", ...).
  Returns:
    float32 ``[B, H, W, C]`` in [-1, 1].
  """
  if lowres.ndim != 4:
    raise ValueError(f"lowres must be [B, h, w, C], got shape {lowres.shape}")
  if len(size) != 2:
    raise ValueError(f"size must be (H, W), got {size}")
  b, _, _, c = lowres.shape
  out = jax.image.resize(
      jnp.asarray(lowres, jnp.float32), (b, int(size[0]), int(size[1]), c), method=method
  )
  return jnp.clip(out, -1.0, 1.0)


def noise_condition_augment(lowres_up: Array, aug_level: Array, noise: Array) -> Array:
  """Noise conditioning augmentation of the SR stages' low-res input (Imagen §2.4, App. D.2).

  The upsampled low-res image is corrupted by a variance-preserving forward process at
  ``aug_level`` in [0, 1] (per example), on the cosine *angle* scale:

      lowres_aug = cos(pi/2 * aug) * lowres_up + sin(pi/2 * aug) * noise

  so aug = 0 is the identity and aug = 1 is pure noise. The network is conditioned on
  ``aug_level`` itself. The paper gives the range and "Gaussian noise augmentation" but not the
  exact map; this is the one in docs/interfaces.md (also imagen-pytorch's cosine at aug_level).

  Args:
    lowres_up: ``[B, H, W, C]`` (already at the stage's resolution).
    aug_level: ``[B]`` (or a scalar), values in [0, 1].
    noise: N(0, I), same shape as ``lowres_up``.
  Returns:
    float32 ``[B, H, W, C]``.
  """
  lowres_up = jnp.asarray(lowres_up, jnp.float32)
  angle = 0.5 * math.pi * per_example(aug_level, lowres_up)
  return jnp.cos(angle) * lowres_up + jnp.sin(angle) * jnp.asarray(noise, jnp.float32)
