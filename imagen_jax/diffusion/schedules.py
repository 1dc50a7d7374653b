"""Continuous-time, variance-preserving noise schedules (Imagen App. A).

Time ``t`` runs from 0 (data) to 1 (noise). A schedule is a strictly decreasing map
``t -> logsnr(t) = log(alpha_t^2 / sigma_t^2)`` and its exact inverse; the forward process is
``q(z_t | x) = N(alpha_t x, sigma_t^2 I)`` with ``alpha_t^2 + sigma_t^2 = 1``, so

    alpha_t^2 = sigmoid(logsnr(t)),    sigma_t^2 = sigmoid(-logsnr(t)).

Two schedules, as in the paper:
* ``cosine`` (base 64x64 and 64->256 stages; Nichol & Dhariwal 2021, in the logSNR form of
  Kingma et al. 2021 "VDM" / Hoogeboom et al. 2023 "simple diffusion");
* ``linear_beta`` (256->1024 stage, Imagen App. A/F): the 1000-step DDPM beta schedule
  1e-4..0.02 (Ho et al. 2020) taken to continuous time.
And DeepFloyd IF's ``squaredcos_cap_v2`` (its 1000-step table, ``diffusion/discrete.py``): t is
the fractional step t (N - 1), logsnr linear between the table's steps.

All functions are pure ``jnp``, float32, and elementwise: ``t`` / ``logsnr`` may have any shape
(the samplers use scalars, training uses ``[B]``).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Schedule(NamedTuple):
  """A noise schedule: ``logsnr_fn(t) -> logsnr`` and its inverse ``t_fn(logsnr) -> t``."""

  logsnr_fn: Callable[[Array], Array]
  t_fn: Callable[[Array], Array]


def _check_bounds(logsnr_min: float, logsnr_max: float) -> None:
  if not logsnr_min < logsnr_max:
    raise ValueError(
        f"logsnr_min must be < logsnr_max, got logsnr_min={logsnr_min}, logsnr_max={logsnr_max}"
    )


def _cosine_angles(logsnr_min: float, logsnr_max: float) -> tuple[float, float, float]:
  """Angles of the shifted cosine schedule, computed in Python float64 (they are constants).

  Returns ``(b, c, a)`` with ``b = arctan(exp(-logsnr_max / 2))`` (the angle at t=0),
  ``c = arctan(exp(logsnr_min / 2)) = pi/2 - arctan(exp(-logsnr_min / 2))`` (the complement of
  the angle at t=1) and ``a = pi/2 - b - c`` (the angle swept as t goes 0 -> 1).
  """
  _check_bounds(logsnr_min, logsnr_max)
  b = math.atan(math.exp(-0.5 * logsnr_max))
  c = math.atan(math.exp(0.5 * logsnr_min))
  return b, c, 0.5 * math.pi - b - c


def cosine_logsnr(t: Array, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> Array:
  """Cosine schedule in logSNR form, shifted so that logsnr(0)=logsnr_max, logsnr(1)=logsnr_min.

  The unclipped cosine schedule has alpha_t = cos(pi t / 2), so
  ``logsnr(t) = -2 log tan(pi t / 2)``, which is +inf at t=0 and -inf at t=1. As in VDM /
  simple diffusion we map t affinely onto the angle range that hits the bounds exactly:

      theta(t) = b + a t,   b = arctan(exp(-logsnr_max/2)),  b + a = arctan(exp(-logsnr_min/2)),
      logsnr(t) = -2 log tan(theta(t)).

  float32 trap: near t=1, theta is within 1e-4 of pi/2 and ``tan`` of it loses several digits.
  So for theta > pi/4 we use the complementary angle, ``-2 log tan(theta) =
  2 log tan(pi/2 - theta)`` with ``pi/2 - theta = c + a (1 - t)`` (``c`` from
  :func:`_cosine_angles`), which is exact to float32 rounding at both ends.

  Args:
    t: time in [0, 1], any shape (values outside are clipped to [0, 1]).
    logsnr_min, logsnr_max: logSNR at t=1 and t=0 (defaults -20, 20 as in VDM).
  Returns:
    logsnr, float32, same shape as ``t``; strictly decreasing in t.
  """
  b, c, a = _cosine_angles(logsnr_min, logsnr_max)
  t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0)
  lo = -2.0 * jnp.log(jnp.tan(b + a * t))  # accurate while theta <= pi/4
  hi = 2.0 * jnp.log(jnp.tan(c + a * (1.0 - t)))  # accurate while theta >= pi/4
  t_mid = (0.25 * math.pi - b) / a  # theta(t_mid) = pi/4, logsnr = 0
  out = jnp.where(t <= t_mid, lo, hi)
  return jnp.clip(out, logsnr_min, logsnr_max)


def cosine_t(logsnr: Array, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> Array:
  """Exact inverse of :func:`cosine_logsnr`.

      t = (arctan(exp(-logsnr/2)) - b) / a            (logsnr >= 0)
        = 1 - (arctan(exp(logsnr/2)) - c) / a        (logsnr < 0; same value, no cancellation)

  Args:
    logsnr: any shape; clipped to [logsnr_min, logsnr_max] first.
  Returns:
    t in [0, 1], float32, same shape.
  """
  b, c, a = _cosine_angles(logsnr_min, logsnr_max)
  logsnr = jnp.clip(jnp.asarray(logsnr, jnp.float32), logsnr_min, logsnr_max)
  pos = (jnp.arctan(jnp.exp(-0.5 * jnp.maximum(logsnr, 0.0))) - b) / a
  neg = 1.0 - (jnp.arctan(jnp.exp(0.5 * jnp.minimum(logsnr, 0.0))) - c) / a
  return jnp.clip(jnp.where(logsnr >= 0.0, pos, neg), 0.0, 1.0)


def _linear_beta_coeffs(beta_start: float, beta_end: float, num_steps: int) -> tuple[float, float]:
  """``(k1, k2)`` with ``-log alpha_bar(t) = k1 t + k2 t^2``.

  k1 = beta_0 T and k2 = (beta_1 - beta_0) T / 2 (see :func:`linear_beta_logsnr`).
  """
  if not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(
        f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, " f"beta_end={beta_end}"
    )
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
  return beta_start * num_steps, 0.5 * (beta_end - beta_start) * num_steps


def linear_beta_logsnr(
    t: Array,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    num_steps: int = 1000,
    logsnr_max: float = 20.0,
) -> Array:
  """The DDPM linear beta schedule (Ho et al. 2020) in continuous time (Imagen App. A, SR1024).

  Derivation. Discrete DDPM uses beta_i = beta_0 + (beta_1 - beta_0) i / (T - 1), i < T, and
  alpha_bar_n = prod_{i<n} (1 - beta_i). With t = n / T and beta(u) = beta_0 + (beta_1-beta_0) u,

      log alpha_bar(t) = sum_{i < tT} log(1 - beta_i) ~= -T int_0^t beta(u) du
                       = -(beta_0 T t + 0.5 (beta_1 - beta_0) T t^2)  =: -g(t),

  the limit used by the VP-SDE (Song et al. 2021, beta_min = 0.1, beta_max = 20). The dropped
  terms are O(beta^2) per step: at t=1 the discrete chain has logsnr ~ -10.12 vs -10.05 here.
  Then logsnr = log(alpha_bar / (1 - alpha_bar)) = -log(expm1(g)), computed as
  ``-g - log(-expm1(-g))``, which neither overflows for large g nor cancels for small g.

  logsnr(0) = +inf in this schedule; we clip at ``logsnr_max`` (default 20, as for cosine; it
  only bites for t < ~2e-8). The paper is silent on this; the clip is a setting.

  Args:
    t: time in [0, 1], any shape (clipped to [0, 1]).
  Returns:
    logsnr, float32, same shape; strictly decreasing; logsnr(1) = -10.05 for the defaults.
  """
  k1, k2 = _linear_beta_coeffs(beta_start, beta_end, num_steps)
  t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0)
  g = k1 * t + k2 * t * t
  # At g = 0 the log is +inf and the clip below gives logsnr_max; jnp.maximum keeps it finite.
  logsnr = -g - jnp.log(jnp.maximum(-jnp.expm1(-g), 1e-30))
  return jnp.minimum(logsnr, logsnr_max)


def linear_beta_t(
    logsnr: Array,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    num_steps: int = 1000,
    logsnr_max: float = 20.0,
) -> Array:
  """Exact inverse of :func:`linear_beta_logsnr`.

  g = -log alpha_bar = -log sigmoid(logsnr) = softplus(-logsnr); solve k2 t^2 + k1 t - g = 0
  for the positive root, in the cancellation-free form

      t = 2 g / (k1 + sqrt(k1^2 + 4 k2 g)).

  Args:
    logsnr: any shape (clipped above at ``logsnr_max``).
  Returns:
    t, float32, same shape, clipped to [0, 1].
  """
  k1, k2 = _linear_beta_coeffs(beta_start, beta_end, num_steps)
  logsnr = jnp.minimum(jnp.asarray(logsnr, jnp.float32), logsnr_max)
  g = jax.nn.softplus(-logsnr)
  t = 2.0 * g / (k1 + jnp.sqrt(k1 * k1 + 4.0 * k2 * g))
  return jnp.clip(t, 0.0, 1.0)


def alpha_sigma(logsnr: Array) -> tuple[Array, Array]:
  """``alpha = sqrt(sigmoid(logsnr))``, ``sigma = sqrt(sigmoid(-logsnr))`` (Imagen App. A).

  ``jax.nn.sigmoid`` is stable for large |logsnr|, so alpha^2 + sigma^2 = 1 to rounding and
  neither underflows to 0 for |logsnr| <= 20 (sigma(20) ~ 4.5e-5).

  Args:
    logsnr: any shape.
  Returns:
    (alpha, sigma), float32, each the shape of ``logsnr``.
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


# ----- DeepFloyd IF's discrete squaredcos_cap_v2 table (diffusion/discrete.py) -----

SQUAREDCOS_STEPS = 1000


@functools.lru_cache(maxsize=8)
def squaredcos_alphas_cumprod(num_steps: int = SQUAREDCOS_STEPS) -> np.ndarray:
  """squaredcos_cap_v2 `alphas_cumprod [N]` (float32; betas in float64, then as diffusers)."""
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
  betas = [min(1 - f((i + 1) / num_steps) / f(i / num_steps), 0.999) for i in range(num_steps)]
  alphas = 1.0 - np.asarray(betas, np.float32)
  out = np.empty_like(alphas)
  acc = np.float32(1.0)
  for i, a in enumerate(alphas):  # float32 products (torch.cumprod: the same to a few ulps)
    acc = np.float32(acc * a)
    out[i] = acc
  out.flags.writeable = False
  return out


def _logsnr_table(num_steps: int) -> np.ndarray:
  a = squaredcos_alphas_cumprod(num_steps).astype(np.float64)
  return np.log(a / (1.0 - a)).astype(np.float32)


def squaredcos_logsnr(t: Array, num_steps: int = SQUAREDCOS_STEPS) -> Array:
  """logsnr at fractional step u = t (N - 1), linear between the table's entries."""
  table = jnp.asarray(_logsnr_table(num_steps))
  u = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0) * (num_steps - 1)
  return jnp.interp(u, jnp.arange(num_steps, dtype=jnp.float32), table)


def squaredcos_t(logsnr: Array, num_steps: int = SQUAREDCOS_STEPS) -> Array:
  """Inverse of `squaredcos_logsnr` (logsnr decreases in t; clamped to the table's range)."""
  table = jnp.asarray(_logsnr_table(num_steps)[::-1].copy())
  u = jnp.interp(
      jnp.asarray(logsnr, jnp.float32), table, jnp.arange(num_steps - 1, -1, -1, dtype=jnp.float32)
  )
  return u / (num_steps - 1)


_SCHEDULES = {
    "cosine": (cosine_logsnr, cosine_t),
    "linear_beta": (linear_beta_logsnr, linear_beta_t),
    "squaredcos_cap_v2": (squaredcos_logsnr, squaredcos_t),
}


@functools.lru_cache(maxsize=None)
def _cached_schedule(name: str, kwargs: tuple) -> Schedule:
  logsnr_fn, t_fn = _SCHEDULES[name]
  kw = dict(kwargs)
  # Validate the keywords now (a bad name or value fails here, not inside a jitted sampler).
  logsnr_fn(jnp.zeros((), jnp.float32), **kw)
  return Schedule(functools.partial(logsnr_fn, **kw), functools.partial(t_fn, **kw))


def get_schedule(name: str, **kwargs) -> Schedule:
  """``Schedule(logsnr_fn, t_fn)`` for ``name in ("cosine", "linear_beta", "squaredcos_cap_v2")``.

  Keyword arguments are passed to both functions (e.g. ``logsnr_min``, ``beta_end``). Results
  are cached, so equal arguments give the *same* object: a Schedule is then a stable static
  argument for ``jax.jit`` (no recompiles from rebuilding it).
  """
  if name not in _SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; allowed: {sorted(_SCHEDULES)}")
  key = tuple(sorted(kwargs.items()))
  try:
    hash(key)
  except TypeError:  # e.g. an array-valued bound: build it uncached
    return _cached_schedule.__wrapped__(name, key)
  return _cached_schedule(name, key)
