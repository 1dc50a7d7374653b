"""Reverse-process samplers: DDPM ancestral, DDIM(eta), DPM-Solver++(2M) (Imagen App. A).

Every sampler talks to the network through one contract,

    DenoiseFn(z_t [B, H, W, C], logsnr [B], cond) -> eps_hat [B, H, W, C],

(classifier-free guidance and SR low-res conditioning are wrapped into ``denoise_fn`` by the
caller). Each step turns eps_hat into x0_hat = (z_t - sigma_t eps_hat) / alpha_t, applies the
thresholding choice to x0_hat (Imagen §2.3), recomputes the eps consistent with the thresholded
x0_hat, and moves from time t to the next grid time s < t.

Notation: lambda = logsnr, alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), and for s < t
    c = 1 - exp(lambda_t - lambda_s) = -expm1(lambda_t - lambda_s)  in (0, 1],
so that for the continuous-time VP process (Kingma et al. 2021, "VDM", App. A)
    q(z_s | z_t, x) = N(alpha_s x + sigma_s sqrt(1 - c) eps(z_t, x),  sigma_s^2 c I).

Time grid (the paper is silent; we choose): ``num_steps + 1`` points uniform in t from ``t_max``
to ``t_min``. Step i calls the network once at t_i and moves to t_{i+1}; the last step lands on
t_min = t_N as if sigma(t_min) were 0, i.e. it returns the (thresholded) x0 prediction, the
clean image "at t_min" (DDPM's last step outputs its mean, Ho et al. 2020; DPM-Solver's
"denoise to zero", Lu et al. 2022). So a sampler costs exactly ``num_steps`` network calls. The
start is z = noise ~ N(0, I), exact up to alpha(t_max)^2 (2e-9 for the default cosine schedule).
Known cost of the uniform-t grid: the last network call is at t = 1/N, so the output is the
posterior mean E[x0 | z_{1/N}] and lacks Var(x0 | z_{1/N}). For cosine that is logsnr 5.5 at
N = 25 (Gaussian-data std -1.2% for DPM-Solver++); for linear_beta it is logsnr 3.9 (std -13%).
A logSNR-uniform grid would fix linear_beta at few steps but is worse for cosine DDIM/DDPM
(tests/test_samplers.py's float64 recursion gives the numbers); not offered yet.

The reverse loop is one ``jax.lax.scan`` over the grid: one compile whatever ``num_steps``.
To reuse that compile across calls, jit the caller with the params as arguments, e.g.

    @functools.partial(jax.jit, static_argnames=("num_steps",))
    def run(params, cond, noise, rng, num_steps):
      fn = make_denoise_fn(model, params, ...)          # closes over traced params
      return sample(fn, cond, noise, rng, sampler="ddim", num_steps=num_steps, schedule=sched)

float32 note: at t_max = 1 (logsnr -20) x0_hat = (z - sigma eps_hat) / alpha divides by
alpha = 4.5e-5, so the first x0_hat carries ~1e-3 absolute rounding error. It is harmless
(the step multiplies it by alpha_s, and thresholding clips it) except for ``num_steps=1``,
whose output *is* that x0_hat; this is inherent to eps-prediction, not to the sampler.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.guidance import THRESHOLD_MODES, apply_threshold, check_percentile
from imagen_jax.diffusion.parameterization import eps_to_x0, x0_to_eps
from imagen_jax.diffusion.schedules import Schedule, alpha_sigma, get_schedule

Array = jax.Array
DenoiseFn = Callable[[Array, Array, Any], Array]

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")


def time_grid(num_steps: int, t_min=0.0, t_max=1.0) -> Array:
  """``num_steps + 1`` times, uniform from ``t_max`` down to ``t_min`` (float32 ``[N + 1]``)."""
  return jnp.linspace(jnp.float32(t_max), jnp.float32(t_min), num_steps + 1, dtype=jnp.float32)


def predict_x0_eps(
    denoise_fn: DenoiseFn,
    z_t: Array,
    logsnr_t: Array,
    cond: Any,
    *,
    threshold: str = "dynamic",
    percentile: float = 99.5,
    max_scale: Optional[float] = None,
) -> tuple[Array, Array]:
  """Call the network once and return the thresholded x0_hat and the eps consistent with it.

      eps_hat = denoise_fn(z_t, lambda_t, cond);  x0_hat = T((z_t - sigma_t eps_hat) / alpha_t)
      eps_hat <- (z_t - alpha_t x0_hat) / sigma_t            (only if T is not the identity)

  Args:
    z_t: ``[B, H, W, C]``; logsnr_t: scalar (shared by the batch; passed to the net as ``[B]``).
  Returns:
    (x0_hat, eps_hat), each ``[B, H, W, C]`` float32.
  """
  batch = z_t.shape[0]
  logsnr_b = jnp.full((batch,), logsnr_t, jnp.float32)
  eps = jnp.asarray(denoise_fn(z_t, logsnr_b, cond), jnp.float32)
  if eps.shape != z_t.shape:
    raise ValueError(f"denoise_fn must return eps_hat shaped like z_t {z_t.shape}, got {eps.shape}")
  x0 = eps_to_x0(eps, z_t, logsnr_t)
  if threshold != "none":
    x0 = apply_threshold(x0, threshold, percentile, max_scale=max_scale)
    eps = x0_to_eps(x0, z_t, logsnr_t)
  return x0, eps


def _reverse_c(logsnr_t: Array, logsnr_s: Array) -> Array:
  """c = 1 - SNR(t)/SNR(s) = -expm1(lambda_t - lambda_s), in (0, 1] for s < t."""
  return -jnp.expm1(logsnr_t - logsnr_s)


def ddim_step(
    z_t: Array,
    x0_hat: Array,
    eps_hat: Array,
    logsnr_t: Array,
    logsnr_s: Array,
    eta,
    noise: Optional[Array],
) -> Array:
  """One DDIM step t -> s (Song et al. 2021, "DDIM", Eq. 12 and 16, in continuous time):

      z_s = alpha_s x0_hat + sqrt(sigma_s^2 - std^2) eps_hat + std * noise,
      std = eta * sigma_s * sqrt(c),     c = 1 - exp(lambda_t - lambda_s).

  eta = 0 is the deterministic DDIM (the probability-flow ODE's first-order solver); eta = 1
  gives std^2 = sigma_s^2 c, the DDPM posterior variance (see :func:`ddpm_step`).
  Shapes: tensors ``[B, H, W, C]``; logsnr_t, logsnr_s, eta scalars; ``noise`` may be None
  when eta is statically 0.
  """
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  c = _reverse_c(logsnr_t, logsnr_s)
  eta = jnp.asarray(eta, jnp.float32)
  dir_coef = sigma_s * jnp.sqrt(jnp.maximum(1.0 - eta * eta * c, 0.0))
  z_s = alpha_s * x0_hat + dir_coef * eps_hat
  if noise is None:
    return z_s
  return z_s + eta * sigma_s * jnp.sqrt(c) * noise


def ddpm_step(
    z_t: Array,
    x0_hat: Array,
    eps_hat: Array,
    logsnr_t: Array,
    logsnr_s: Array,
    noise: Array,
    gamma=0.0,
) -> Array:
  """One DDPM ancestral step t -> s (Ho et al. 2020; continuous-time VP as in VDM App. A):

      z_s ~ N(mu, std^2 I),  mu = alpha_s x0_hat + sigma_s sqrt(1 - c) eps_hat
                               = alpha_s (1 - c) z_t / alpha_t + alpha_s c x0_hat,
      std^2 = (sigma_s^2 c)^(1 - gamma) * (sigma_t^2 c)^gamma.

  gamma = 0 is the true posterior variance q(z_s | z_t, x0_hat) (Ho et al.'s sigma~^2);
  gamma = 1 the forward variance sigma_{t|s}^2 = sigma_t^2 c (Ho et al.'s beta_t); in between,
  the log-space interpolation of Nichol & Dhariwal 2021 Eq. 15, Imagen App. A's "stochasticity"
  knob. ``eps_hat`` must be consistent with ``x0_hat`` and ``z_t``; then the two forms of mu
  agree (the first avoids dividing by alpha_t ~ 4.5e-5 at t = 1).
  """
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  _, sigma_t = alpha_sigma(logsnr_t)
  c = _reverse_c(logsnr_t, logsnr_s)
  mean = alpha_s * x0_hat + sigma_s * jnp.sqrt(1.0 - c) * eps_hat
  gamma = jnp.asarray(gamma, jnp.float32)
  std = jnp.sqrt(c) * sigma_s ** (1.0 - gamma) * sigma_t**gamma
  return mean + std * noise


def dpmpp_2m_step(
    z_t: Array,
    x0_hat: Array,
    x0_prev: Array,
    logsnr_prev: Array,
    logsnr_t: Array,
    logsnr_s: Array,
    first: Array,
) -> Array:
  """One DPM-Solver++(2M) step t -> s, data-prediction form (Lu et al. 2022, Alg. 2).

  Lu et al.'s lambda is log(alpha / sigma) = logsnr / 2, hence the halves:

      h = (lambda_s - lambda_t) / 2,  h_prev = (lambda_t - lambda_prev) / 2,  r = h_prev / h,
      D = (1 + 1/(2r)) x0_hat(t) - 1/(2r) x0_hat(prev)     (first step: D = x0_hat(t)),
      z_s = (sigma_s / sigma_t) z_t - alpha_s expm1(-h) D.

  With D = x0_hat this is exactly DDIM(eta=0). Shapes: tensors ``[B, H, W, C]``; logsnrs and
  ``first`` (bool: no previous x0_hat yet) are scalars.
  """
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  _, sigma_t = alpha_sigma(logsnr_t)
  h = 0.5 * (logsnr_s - logsnr_t)
  h_prev = jnp.where(first, h, 0.5 * (logsnr_t - logsnr_prev))  # placeholder avoids 1/0
  k = jnp.where(first, 0.0, 0.5 * h / h_prev)  # k = 1 / (2 r)
  d = (1.0 + k) * x0_hat - k * x0_prev
  return (sigma_s / sigma_t) * z_t - alpha_s * jnp.expm1(-h) * d


def _is_static_zero(x) -> bool:
  return isinstance(x, numbers.Real) and float(x) == 0.0


def _check_times(t_min, t_max) -> None:
  if isinstance(t_min, numbers.Real) and isinstance(t_max, numbers.Real):
    if not 0.0 <= float(t_min) < float(t_max) <= 1.0:
      raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")


def sample(
    denoise_fn: DenoiseFn,
    cond: Any,
    noise: Array,
    rng: Optional[Array],
    *,
    sampler: str,
    num_steps: int,
    schedule: Union[Schedule, str],
    eta=0.0,
    threshold: str = "dynamic",
    percentile: float = 99.5,
    t_min=0.0,
    t_max=1.0,
    gamma=0.0,
    max_scale: Optional[float] = None,
) -> Array:
  """Draw x0 ~ p(x0 | cond) by running the reverse process from z = noise (Imagen App. A).

  Args:
    denoise_fn: ``DenoiseFn(z_t, logsnr [B], cond) -> eps_hat`` (may itself be jitted).
    cond: any pytree, passed through to ``denoise_fn`` unchanged.
    noise: the initial z at t_max, N(0, I), ``[B, H, W, C]``.
    rng: PRNG key for the stochastic samplers (step i uses ``fold_in(rng, i)``), or a ``[B]``
      array of typed keys (``jax.random.key``), one stream per sample, so that a sample's noise
      does not depend on the batch it is drawn in; unused (and may be None) for "dpmpp_2m" and
      for "ddim" with a static ``eta == 0``.
    sampler: "ddpm" (ancestral, :func:`ddpm_step`), "ddim" (:func:`ddim_step`) or "dpmpp_2m"
      (:func:`dpmpp_2m_step`). Static.
    num_steps: number of network calls, static int >= 1.
    schedule: a :class:`Schedule` or a schedule name for :func:`get_schedule`. Static.
    eta: DDIM stochasticity in [0, 1] ("ddim" only).
    threshold: "none", "static" or "dynamic" (applied to x0_hat at every step). Static.
    percentile: dynamic-thresholding percentile in (0, 100]. Static.
    t_min, t_max: ends of the time grid, 0 <= t_min < t_max <= 1.
    gamma: DDPM variance interpolation ("ddpm" only; 0 = posterior variance).
    max_scale: optional cap on the dynamic-thresholding s (DeepFloyd IF). Static.
  Returns:
    x0 ``[B, H, W, C]`` float32: the thresholded x0 prediction of the last step.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; allowed: {SAMPLERS}")
  if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
    raise ValueError(f"num_steps must be a static int >= 1, got {num_steps!r}")
  if threshold not in THRESHOLD_MODES:
    raise ValueError(f"unknown threshold mode {threshold!r}; allowed: {THRESHOLD_MODES}")
  if threshold == "dynamic":
    check_percentile(percentile)
  if isinstance(eta, numbers.Real) and not 0.0 <= float(eta) <= 1.0:
    raise ValueError(
        f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM variance), " f"got {eta}"
    )
  _check_times(t_min, t_max)
  if isinstance(schedule, str):
    schedule = get_schedule(schedule)
  z = jnp.asarray(noise, jnp.float32)
  if z.ndim < 2:
    raise ValueError(f"noise must be [B, ...] (batch first), got shape {z.shape}")

  needs_noise = sampler == "ddpm" or (sampler == "ddim" and not _is_static_zero(eta))
  if needs_noise and rng is None:
    raise ValueError(
        f"sampler {sampler!r} (eta={eta}) draws noise at every step: pass a PRNG " f"key as rng"
    )
  per_sample = (
      needs_noise and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.ndim > 0
  )
  if per_sample and rng.shape != z.shape[:1]:
    raise ValueError(
        f"rng must be one PRNG key or [B] = [{z.shape[0]}] typed keys (one per "
        f"sample), got keys of shape {rng.shape}"
    )
  return _reverse_loop(
      denoise_fn,
      sampler,
      int(num_steps),
      schedule,
      threshold,
      check_percentile(percentile) if threshold == "dynamic" else 99.5,
      None if max_scale is None else float(max_scale),
      needs_noise,
      per_sample,
      cond,
      z,
      rng,
      *(jnp.asarray(v, jnp.float32) for v in (eta, t_min, t_max, gamma)),
  )


# Deliberately not jitted here: a jit with `denoise_fn` as a static argument would keep every
# denoise_fn -- and the network params it closes over -- alive in jit's cache, and embed those
# params as constants in the program. Callers that sample repeatedly jit `sample` themselves
# with params as traced arguments (see the module docstring); eager calls compile the scan
# once per call.
def _reverse_loop(
    denoise_fn,
    sampler,
    num_steps,
    schedule,
    threshold,
    percentile,
    max_scale,
    needs_noise,
    per_sample,
    cond,
    z,
    rng,
    eta,
    t_min,
    t_max,
    gamma,
):
  """The scan of :func:`sample` (arguments already validated; see there)."""
  logsnrs = schedule.logsnr_fn(time_grid(num_steps, t_min, t_max))  # [N + 1]
  steps = jnp.arange(num_steps, dtype=jnp.int32)
  is_last = steps == num_steps - 1

  def step(carry, xs):
    z_t, x0_prev, logsnr_prev = carry
    i, logsnr_t, logsnr_s, last = xs
    x0_hat, eps_hat = predict_x0_eps(
        denoise_fn,
        z_t,
        logsnr_t,
        cond,
        threshold=threshold,
        percentile=percentile,
        max_scale=max_scale,
    )
    step_noise = None
    if needs_noise and per_sample:
      step_noise = jax.vmap(
          lambda k: jax.random.normal(jax.random.fold_in(k, i), z_t.shape[1:], jnp.float32)
      )(rng)
    elif needs_noise:
      step_noise = jax.random.normal(jax.random.fold_in(rng, i), z_t.shape, jnp.float32)
    if sampler == "ddpm":
      z_s = ddpm_step(z_t, x0_hat, eps_hat, logsnr_t, logsnr_s, step_noise, gamma)
    elif sampler == "ddim":
      z_s = ddim_step(z_t, x0_hat, eps_hat, logsnr_t, logsnr_s, eta, step_noise)
    else:
      z_s = dpmpp_2m_step(z_t, x0_hat, x0_prev, logsnr_prev, logsnr_t, logsnr_s, i == 0)
    # Final step "to x0": sigma(t_min) is taken as 0, so z_s is the x0 prediction itself.
    z_s = jnp.where(last, x0_hat, z_s)
    return (z_s, x0_hat, logsnr_t), None

  init = (z, jnp.zeros_like(z), logsnrs[0])
  (x0, _, _), _ = jax.lax.scan(step, init, (steps, logsnrs[:-1], logsnrs[1:], is_last))
  return x0
