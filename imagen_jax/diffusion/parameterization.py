"""Conversions between the three prediction targets: eps, x0 and v (Imagen App. A).

With z_t = alpha x0 + sigma eps and alpha^2 + sigma^2 = 1 (alpha, sigma from ``logsnr``):

    x0  = (z_t - sigma eps) / alpha          eps = (z_t - alpha x0) / sigma
    v   = alpha eps - sigma x0               (Salimans & Ho 2022, "progressive distillation")
    x0  = alpha z_t - sigma v                eps = sigma z_t + alpha v

Imagen predicts eps; v (Imagen Video) and x0 are stage settings. Shapes: tensors are
``[B, H, W, C]``; ``logsnr`` is ``[B]`` or a scalar. All in float32.

Conditioning trap: x0 from eps divides by alpha (4.5e-5 at logsnr=-20) and eps from x0 divides
by sigma (4.5e-5 at logsnr=+20); at those ends the conversions amplify errors by ~2e4. The v
forms never divide.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.forward import per_example
from imagen_jax.diffusion.schedules import alpha_sigma

Array = jax.Array

TARGETS = ("eps", "v", "x0")


def _check_target(target: str) -> None:
  if target not in TARGETS:
    raise ValueError(f"unknown prediction target {target!r}; allowed: {TARGETS}")


def _coeffs(z_t: Array, logsnr: Array) -> tuple[Array, Array, Array]:
  z_t = jnp.asarray(z_t, jnp.float32)
  alpha, sigma = alpha_sigma(per_example(logsnr, z_t))
  return z_t, alpha, sigma


def eps_to_x0(eps: Array, z_t: Array, logsnr: Array) -> Array:
  """x0 = (z_t - sigma eps) / alpha."""
  z_t, alpha, sigma = _coeffs(z_t, logsnr)
  return (z_t - sigma * eps) / alpha


def x0_to_eps(x0: Array, z_t: Array, logsnr: Array) -> Array:
  """eps = (z_t - alpha x0) / sigma."""
  z_t, alpha, sigma = _coeffs(z_t, logsnr)
  return (z_t - alpha * x0) / sigma


def v_to_x0(v: Array, z_t: Array, logsnr: Array) -> Array:
  """x0 = alpha z_t - sigma v."""
  z_t, alpha, sigma = _coeffs(z_t, logsnr)
  return alpha * z_t - sigma * v


def v_to_eps(v: Array, z_t: Array, logsnr: Array) -> Array:
  """eps = sigma z_t + alpha v."""
  z_t, alpha, sigma = _coeffs(z_t, logsnr)
  return sigma * z_t + alpha * v


def v_from(x0: Array, eps: Array, logsnr: Array) -> Array:
  """v = alpha eps - sigma x0 (the regression target of a v-prediction network)."""
  x0 = jnp.asarray(x0, jnp.float32)
  alpha, sigma = alpha_sigma(per_example(logsnr, x0))
  return alpha * eps - sigma * x0


def prediction_to_eps(pred: Array, z_t: Array, logsnr: Array, target: str) -> Array:
  """The eps implied by a network output ``pred`` in ``target`` space ("eps", "v" or "x0").

  Args:
    pred, z_t: ``[B, H, W, C]``; logsnr: ``[B]`` or scalar; target: static string.
  Returns:
    eps_hat ``[B, H, W, C]`` float32.
  """
  _check_target(target)
  pred = jnp.asarray(pred, jnp.float32)
  if target == "eps":
    return pred
  if target == "v":
    return v_to_eps(pred, z_t, logsnr)
  return x0_to_eps(pred, z_t, logsnr)


def prediction_to_x0(pred: Array, z_t: Array, logsnr: Array, target: str) -> Array:
  """The x0 implied by a network output ``pred`` in ``target`` space ("eps", "v" or "x0")."""
  _check_target(target)
  pred = jnp.asarray(pred, jnp.float32)
  if target == "x0":
    return pred
  if target == "v":
    return v_to_x0(pred, z_t, logsnr)
  return eps_to_x0(pred, z_t, logsnr)


def prediction_to_v(pred: Array, z_t: Array, logsnr: Array, target: str) -> Array:
  """The v implied by a network output ``pred`` in ``target`` space ("eps", "v" or "x0")."""
  _check_target(target)
  pred = jnp.asarray(pred, jnp.float32)
  if target == "v":
    return pred
  x0 = prediction_to_x0(pred, z_t, logsnr, target)
  eps = prediction_to_eps(pred, z_t, logsnr, target)
  return v_from(x0, eps, logsnr)


def convert_prediction(pred: Array, z_t: Array, logsnr: Array, source: str, target: str) -> Array:
  """Convert a prediction from ``source`` space to ``target`` space (both in ``TARGETS``)."""
  _check_target(target)
  fn = {"eps": prediction_to_eps, "x0": prediction_to_x0, "v": prediction_to_v}[target]
  return fn(pred, z_t, logsnr, source)
