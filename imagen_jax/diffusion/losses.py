"""Per-example diffusion regression loss (Imagen App. A: eps-prediction, MSE in eps space).

    loss_b = w_b * mean_{h,w,c} (pred_b - target_b)^2

where target is the true eps (``noise``), v = alpha eps - sigma x0, or x0, chosen by the stage's
prediction ``target``. By default the loss lives in the target's own space; ``space`` lets a
stage regress in a different space (e.g. predict v, measure the error in eps space), converting
the prediction with ``z_t`` and ``logsnr``. Computed in float32 whatever ``pred``'s dtype.

Loss weighting over time (``loss_weights``; the stage's ``train.loss_weighting``):

* ``none``: w = 1, the paper's plain loss (Imagen App. A; Ho et al. 2020's "simple" loss).
* ``min_snr``: Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
  Weighting Strategy", §3.4): in x0 space the weight is min(SNR, gamma), SNR = exp(logsnr);
  the same objective measured in eps or v space divides by the factor that space's error
  carries (|eps error|^2 = SNR |x0 error|^2, |v error|^2 = (1 + SNR) |x0 error|^2):

      w_x0 = min(SNR, gamma),  w_eps = min(SNR, gamma) / SNR,  w_v = min(SNR, gamma) / (SNR + 1).

  gamma = 5 is the paper's default. It clamps the weight of the low-noise (high SNR) steps,
  whose easy targets otherwise dominate the gradient.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.parameterization import TARGETS, convert_prediction, v_from

Array = jax.Array

LOSS_WEIGHTINGS = ("none", "min_snr")
MIN_SNR_GAMMA = 5.0  # Hang et al. 2023's default


def min_snr_weight(logsnr: Array, gamma: float = MIN_SNR_GAMMA, *, space: str = "eps") -> Array:
  """Min-SNR-gamma weight of a loss measured in ``space`` (see the module doc), ``[B]`` float32.

  Computed from logsnr without forming SNR itself (exp(20) overflows nothing in float32, but
  its quotients lose precision): w_eps = exp(min(logsnr, log gamma) - logsnr),
  w_v = exp(min(logsnr, log gamma)) * sigmoid(-logsnr), w_x0 = exp(min(logsnr, log gamma)).
  """
  if space not in TARGETS:
    raise ValueError(f"unknown loss space {space!r}; allowed: {TARGETS}")
  gamma = float(gamma)
  if not gamma > 0.0:  # also refuses NaN
    raise ValueError(f"min_snr_gamma must be > 0 (the paper uses 5), got {gamma!r}")
  logsnr = jnp.asarray(logsnr, jnp.float32)
  clamped = jnp.minimum(logsnr, jnp.log(jnp.float32(gamma)))  # log min(SNR, gamma)
  if space == "eps":
    return jnp.exp(clamped - logsnr)
  if space == "v":
    return jnp.exp(clamped) * jax.nn.sigmoid(-logsnr)
  return jnp.exp(clamped)


def loss_weights(
    logsnr: Array, *, weighting: str, gamma: float = MIN_SNR_GAMMA, space: str = "eps"
) -> Optional[Array]:
  """The per-example weights ``[B]`` of ``weighting`` for a loss in ``space``; None for
  ``none`` (the paper's unweighted loss)."""
  if weighting not in LOSS_WEIGHTINGS:
    raise ValueError(f"unknown loss weighting {weighting!r}; allowed: {LOSS_WEIGHTINGS}")
  if weighting == "none":
    return None
  return min_snr_weight(logsnr, gamma, space=space)


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
    weights: optional ``[B]`` per-example weights (e.g. ``loss_weights``, or 0 for padding).
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
