"""Per-example diffusion regression loss (Imagen App. A: eps-prediction, MSE in eps space).

    loss_b = w_b * mean_{h,w,c} (pred_b - target_b)^2

where target is the true eps (``noise``), v = alpha eps - sigma x0, or x0, chosen by the stage's
prediction ``target``. By default the loss lives in the target's own space; ``space`` lets a
stage regress in a different space (e.g. predict v, measure the error in eps space), converting
the prediction with ``z_t`` and ``logsnr``. Computed in float32 whatever ``pred``'s dtype.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.parameterization import TARGETS, convert_prediction, v_from

Array = jax.Array


def regression_target(*, x0: Array, noise: Array, logsnr: Array, target: str) -> Array:
  """The exact value a perfect ``target``-space network would output: eps, v or x0."""
  if target not in TARGETS:
    raise ValueError(f"unknown prediction target {target!r}; allowed: {TARGETS}")
  if target == "eps":
    return jnp.asarray(noise, jnp.float32)
  if target == "x0":
    return jnp.asarray(x0, jnp.float32)
  return v_from(x0, noise, logsnr)


def diffusion_loss(
    pred: Array,
    *,
    x0: Array,
    noise: Array,
    z_t: Array,
    logsnr: Array,
    target: str,
    weights: Optional[Array] = None,
    space: Optional[str] = None,
) -> Array:
  """Per-example weighted MSE between the network output and its regression target.

  Args:
    pred: network output ``[B, H, W, C]`` in ``target`` space (any float dtype).
    x0: clean images ``[B, H, W, C]``; noise: the eps used to make ``z_t``.
    z_t: ``q_sample(x0, logsnr, noise)``; only used when ``space != target``.
    logsnr: ``[B]``.
    target: what the network predicts, "eps" (paper), "v" or "x0".
    weights: optional ``[B]`` per-example weights (e.g. min-SNR, or 0 for padding examples).
    space: where the error is measured; ``None`` means ``target``.
  Returns:
    ``[B]`` float32 losses (mean over all non-batch axes, times ``weights``).
  """
  pred = jnp.asarray(pred, jnp.float32)
  space = target if space is None else space
  if space != target:
    pred = convert_prediction(pred, z_t, logsnr, target, space)
  tgt = regression_target(x0=x0, noise=noise, logsnr=logsnr, target=space)
  if pred.shape != tgt.shape:
    raise ValueError(f"pred shape {pred.shape} does not match the target shape {tgt.shape}")
  per_ex = jnp.mean(jnp.square(pred - tgt), axis=tuple(range(1, pred.ndim)))
  if weights is None:
    return per_ex
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != per_ex.shape:
    raise ValueError(
        f"weights must have shape {per_ex.shape} (one per example), " f"got {weights.shape}"
    )
  return weights * per_ex
