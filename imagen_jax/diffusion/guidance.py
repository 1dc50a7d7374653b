"""Classifier-free guidance and x0 thresholding (Imagen §2.2, §2.3, Fig. A.31).

Shapes: ``eps_*`` and ``x0`` are ``[B, H, W, C]`` (any rank >= 1 with the batch first);
per-example scalars are ``[B]``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion.forward import per_example
from imagen_jax.diffusion.schedules import alpha_sigma
from imagen_jax.diffusion.static import static_real

Array = jax.Array

THRESHOLD_MODES = ("none", "static", "dynamic")


class PercentileScaleWarning(UserWarning):
  """A dynamic-thresholding percentile below 1: probably a quantile given on the 0-1 scale."""


def check_guidance_weight(guidance_weight) -> float:
  """A settings-time guidance weight w (a Python number) -> float; non-finite w is refused.

  NaN or inf w turns every guided eps, hence every image, into NaN; refused here where w is
  set, since inside a jitted sampler w is a traced value that cannot be checked.
  """
  w = static_real("guidance_weight", guidance_weight, "(the paper's w, §2.2: 1 = no guidance)")
  if not math.isfinite(w):
    raise ValueError(
        f"guidance_weight must be finite (the paper's w, §2.2: 1 = no guidance, e.g. 1.35 for "
        f"the 64px base and 8 for SR on COCO), got {guidance_weight!r}"
    )
  return w


def classifier_free_guidance(eps_cond: Array, eps_uncond: Array, guidance_weight) -> Array:
  """Classifier-free guidance with the paper's w (Imagen §2.2, Ho & Salimans 2021):

      eps_tilde = w * eps(z, c) + (1 - w) * eps(z, null)

  w = 1 is no guidance (returns ``eps_cond`` exactly), w = 0 is unconditional (returns
  ``eps_uncond`` exactly). Convention trap: some code uses g = w - 1,
  ``cond * (1 + g) - uncond * g``; the paper's w (COCO: 1.35 base, 8.0 SR) is used here.

  Args:
    eps_cond, eps_uncond: ``[B, H, W, C]``.
    guidance_weight: a scalar or ``[B]`` (one w per example). A Python number or a concrete
      array must be finite (ValueError otherwise); a traced w is checked where it is set
      (:func:`check_guidance_weight`).
  Returns:
    ``[B, H, W, C]`` float32.
  """
  if isinstance(guidance_weight, numbers.Real):
    check_guidance_weight(guidance_weight)
  elif not isinstance(guidance_weight, jax.core.Tracer):
    w_host = np.asarray(guidance_weight, np.float64)
    if not np.all(np.isfinite(w_host)):
      raise ValueError(
          f"guidance_weight must be finite (the paper's w, §2.2: 1 = no guidance), got "
          f"{w_host.tolist()}"
      )
  eps_cond = jnp.asarray(eps_cond, jnp.float32)
  eps_uncond = jnp.asarray(eps_uncond, jnp.float32)
  w = per_example(guidance_weight, eps_cond)
  # This form (not u + w (c - u)) makes w = 1 and w = 0 exact in floating point.
  return w * eps_cond + (1.0 - w) * eps_uncond


def static_threshold(x0: Array) -> Array:
  """Static thresholding (Imagen §2.3): clip x0_hat to [-1, 1]."""
  return jnp.clip(jnp.asarray(x0, jnp.float32), -1.0, 1.0)


def check_percentile(percentile, *, warn: bool = True, stacklevel: int = 2) -> float:
  """Validate a dynamic-thresholding percentile: a static number in (0, 100].

  Trap (diffusers issue 7165, copied into maxdiffusion): ``jnp.percentile`` takes q on the
  0-100 scale, so passing the *quantile* 0.995 silently computes the 0.995th percentile (about
  the smallest |x0|), which makes s = max(s, 1) = 1 and turns dynamic into static
  thresholding. 0.995 is a legal percentile, so it is not rejected; with ``warn`` a percentile
  below 1 gives a :class:`PercentileScaleWarning`, once, where the setting is made (sampler
  settings), not at every step. The paper's value is 99.5.

  Args:
    percentile: the value to check.
    warn: warn for a percentile below 1.
    stacklevel: passed to ``warnings.warn`` (2 = the caller of this function).
  """
  p = static_real("percentile", percentile, "in (0, 100]")
  if not 0.0 < p <= 100.0:
    raise ValueError(
        f"percentile must be in (0, 100] (the 0-100 scale of jnp.percentile; the "
        f"paper uses 99.5), got {percentile}"
    )
  if warn and p < 1.0:
    warnings.warn(
        f"dynamic-thresholding percentile={p} is on the 0-100 scale: it means the {p}th "
        f"percentile of |x0|, not the {p * 100:g}th (did you mean {p * 100:g}?); s = max(s, 1) "
        "is then 1 for almost every sample, the same as static thresholding. The paper uses "
        "99.5.",
        PercentileScaleWarning,
        stacklevel=stacklevel,
    )
  return p


def dynamic_threshold(
    x0: Array, percentile: float = 99.5, *, max_scale: Optional[float] = None
) -> Array:
  """Dynamic thresholding exactly as Imagen Fig. A.31 means it, per sample:

      s = percentile(|x0_b|, p)   over all pixels and channels of sample b (p on 0-100 scale)
      s = maximum(s, 1)           (the paper's ``jnp.max(s, 1.0)`` would be an *axis* argument)
      x0_b = clip(x0_b, -s, s) / s

  so the output is always in [-1, 1], and a sample with every |x| <= 1 is left unchanged.

  Args:
    x0: ``[B, ...]`` predicted clean images.
    percentile: static number in (0, 100]; the paper uses 99.5. See :func:`check_percentile`
      (validated here; the below-1 warning is given where the setting is made, not per step).
    max_scale: optional upper cap c >= 1 on s (DeepFloyd IF, s in [1, c]); ``None`` = no cap.
  Returns:
    float32 array, the shape of ``x0``.
  """
  p = check_percentile(percentile, warn=False)
  x0 = jnp.asarray(x0, jnp.float32)
  if x0.ndim < 2:
    raise ValueError(f"x0 must be [B, ...] with at least one non-batch axis, got {x0.shape}")
  flat = jnp.abs(x0).reshape(x0.shape[0], -1)
  s = jnp.percentile(flat, p, axis=1)  # [B]; method "linear" like NumPy
  s = jnp.maximum(s, 1.0)
  if max_scale is not None:
    if not float(max_scale) >= 1.0:
      raise ValueError(
          f"max_scale must be >= 1 (s is clipped to [1, max_scale]), got " f"{max_scale}"
      )
    s = jnp.minimum(s, float(max_scale))
  s = per_example(s, x0)  # [B, 1, 1, 1]
  return jnp.clip(x0, -s, s) / s


def apply_threshold(
    x0: Array, mode: str = "dynamic", percentile: float = 99.5, *, max_scale: Optional[float] = None
) -> Array:
  """Apply the sampler's thresholding choice to x0_hat: ``mode in ("none", "static", "dynamic")``.

  ``percentile`` and ``max_scale`` are used only by "dynamic".
  """
  if mode == "none":
    return jnp.asarray(x0, jnp.float32)
  if mode == "static":
    return static_threshold(x0)
  if mode == "dynamic":
    return dynamic_threshold(x0, percentile, max_scale=max_scale)
  raise ValueError(f"unknown threshold mode {mode!r}; allowed: {THRESHOLD_MODES}")


# ----- per-step guidance weights and CFG rescale -----

GUIDANCE_SCHEDULES = ("constant", "linear")


def check_guidance_schedule(name: str) -> str:
  """A guidance-schedule name (see :func:`guidance_weight_at`), or a clear error."""
  if name not in GUIDANCE_SCHEDULES:
    raise ValueError(f"unknown guidance_schedule {name!r}; allowed: {GUIDANCE_SCHEDULES}")
  return name


def guidance_weight_at(guidance_weight, t: Array, schedule: str = "constant") -> Array:
  """The guidance weight w(t) of one network call at time t (t = 1 noise, t = 0 data):

      "constant":  w(t) = w                            (Imagen §2.2)
      "linear":    w(t) = 1 + 2 (w - 1) (1 - t)        (increasing as the sample denoises)

  "linear" is the increasing linear schedule of Wang et al. 2024 ("Analysis of Classifier-Free
  Guidance Weight Schedulers", §4), written for the paper's w (1 = no guidance): no guidance at
  pure noise, 2w - 1 at the data end, and the same mean over t in [0, 1] as the constant w
  (that normalisation is our choice). w = 1 gives 1 at every t under both.

  Args:
    guidance_weight: the paper's w, a scalar (Python number or traced).
    t: ``[B]`` (or scalar) times in [0, 1].
    schedule: a name in ``GUIDANCE_SCHEDULES``; static.
  Returns:
    w(t) float32, the shape of ``t``.
  """
  check_guidance_schedule(schedule)
  w = jnp.asarray(guidance_weight, jnp.float32)
  t = jnp.asarray(t, jnp.float32)
  if schedule == "constant":
    return jnp.broadcast_to(w, t.shape)
  return 1.0 + 2.0 * (w - 1.0) * (1.0 - t)


def check_guidance_rescale(phi) -> float:
  """CFG-rescale phi as a Python float in [0, 1] (Lin et al. 2023 §3.4; 0 = off), or an error."""
  value = static_real("guidance_rescale", phi, "in [0, 1] (Lin et al.'s phi)")
  if not 0.0 <= value <= 1.0:
    raise ValueError(
        f"guidance_rescale must be in [0, 1] (Lin et al. 2023's phi: 0 = plain guidance, 1 = the "
        f"conditional prediction's std; they use 0.7), got {phi!r}"
    )
  return value


def rescale_guidance(
    eps_cfg: Array, eps_cond: Array, z_t: Array, logsnr: Array, guidance_rescale: float
) -> Array:
  """CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
  Flawed", §3.4, Eq. 15-18), applied to the x0 prediction:

      x0_rescaled = x0_cfg * std(x0_cond) / std(x0_cfg)
      x0_final    = phi * x0_rescaled + (1 - phi) * x0_cfg  =  f * x0_cfg,
      f           = phi * std(x0_cond) / std(x0_cfg) + (1 - phi),

  std per sample over all its pixels and channels; x0 = (z_t - sigma eps) / alpha (x0_cfg is
  the CFG of the two x0 predictions, the conversion being affine with shared coefficients).

  Which prediction: Lin et al. state it on "the" prediction of their v-prediction network (their
  Alg. 2 rescales v). With eps-prediction eps_hat is close to unit variance at every t whatever
  the image, so matching eps stds would leave untouched the over-exposure that guidance causes,
  which is an inflated std of the predicted image; so the rescale acts on x0_hat, the image
  each step moves toward. In eps (alpha x0 = z_t - sigma eps; the stds' ratio is scale-free):

      eps_final = (z_t - f (z_t - sigma eps_cfg)) / sigma = f eps_cfg + (1 - f) z_t / sigma,

  with no division by alpha (4.5e-5 at logsnr -20). phi = 0 returns ``eps_cfg`` exactly.

  Args:
    eps_cfg: the guided eps (:func:`classifier_free_guidance`), ``[B, H, W, C]``.
    eps_cond: the conditional eps, ``[B, H, W, C]``.
    z_t: ``[B, H, W, C]``; logsnr: ``[B]`` or scalar.
    guidance_rescale: phi in [0, 1], a static Python number.
  Returns:
    ``[B, H, W, C]`` float32.
  """
  phi = check_guidance_rescale(guidance_rescale)
  eps_cfg = jnp.asarray(eps_cfg, jnp.float32)
  if phi == 0.0:
    return eps_cfg
  z_t = jnp.asarray(z_t, jnp.float32)
  _, sigma = alpha_sigma(per_example(logsnr, z_t))
  axes = tuple(range(1, z_t.ndim))
  std_cond = jnp.std(z_t - sigma * eps_cond, axis=axes)  # [B], alpha std(x0_cond)
  std_cfg = jnp.std(z_t - sigma * eps_cfg, axis=axes)
  ratio = jnp.where(std_cfg > 0.0, std_cond / jnp.where(std_cfg > 0.0, std_cfg, 1.0), 1.0)
  f = per_example(phi * ratio + (1.0 - phi), z_t)
  return f * eps_cfg + (1.0 - f) * z_t / sigma
