"""EDM sampling (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"): the Karras sigma grid and Heun's 2nd-order solver, on the VP process of the samplers.

EDM's variables are the VP ones rescaled by 1/alpha (Karras et al. §4, Eq. 4 with s(t) = alpha):

    sigma_edm = sigma / alpha = exp(-logsnr / 2),    x = z / alpha = x0 + sigma_edm eps,

and the probability-flow ODE is dx/dsigma_edm = (x - D(x)) / sigma_edm = eps_hat (Eq. 3 with
D = x0_hat). Every update below is written back in z (never dividing by alpha, which is 4.5e-5
at logsnr -20) from the pair (x0_hat, eps_hat) that ``samplers.predict_x0_eps`` returns, so the
thresholding of Imagen §2.3 applies to each network call of these solvers too.

Euler's method on this ODE is exactly deterministic DDIM (x_s = x0_hat + sigma_edm(s) eps_hat,
i.e. z_s = alpha_s x0_hat + sigma_s eps_hat). Euler ancestral (k-diffusion's
``sample_euler_ancestral``: step down to sigma_down, then add sigma_up noise, with
sigma_up = eta sigma_s sqrt(1 - sigma_s^2 / sigma_t^2) and sigma_down^2 = sigma_s^2 - sigma_up^2,
all in EDM sigmas) is exactly DDIM(eta): since sigma_s^2 / sigma_t^2 = exp(lambda_t - lambda_s)
= 1 - c, alpha_s sigma_up = eta sigma_s sqrt(c), DDIM's std. So the samplers run "euler_ancestral"
through ``samplers.ddim_step`` with eta = 1 (tests/test_karras.py checks it against the
k-diffusion formula in EDM variables).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion.schedules import Schedule, alpha_sigma

Array = jax.Array
# predict(z [B, H, W, C], logsnr []) -> (x0_hat, eps_hat), the thresholded pair of one call.
Predict = Callable[[Array, Array], tuple[Array, Array]]

# EDM's defaults (Karras et al. 2022, Table 1, "ours" column): sigma in [0.002, 80], rho = 7.
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def edm_sigma(logsnr):
  """sigma_edm = sigma / alpha = exp(-logsnr / 2) (Karras et al. §4); any shape."""
  return jnp.exp(-0.5 * jnp.asarray(logsnr, jnp.float32))


def karras_sigmas(num_points: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
  """The Karras grid (Karras et al. 2022, Eq. 5), float64 ``[num_points]``, decreasing:

      sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,

  i = 0..n-1 (n = 1 gives [sigma_max]). rho = 7 spaces the steps densely at low noise; rho = 1
  is uniform in sigma, rho -> inf uniform in log sigma (= uniform in logSNR).
  """
  if not 0.0 < sigma_min < sigma_max:
    raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
  frac = np.linspace(0.0, 1.0, num_points) if num_points > 1 else np.zeros(1)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (hi + frac * (lo - hi)) ** rho


def karras_time_grid(
    schedule: Schedule,
    num_steps: int,
    *,
    t_min: float,
    t_max: float,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> Array:
  """The sampler's ``num_steps + 1`` times on the Karras grid (float32 ``[N + 1]``).

  EDM (Eq. 5) puts its N network calls at sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min
  and ends at sigma_N = 0; the samplers call the network at t_0..t_{N-1} and return the x0
  prediction at t_N (as if sigma there were 0), so

      t_i = t(sigma_i)  (i < N, Eq. 5 with n = N),     t_N = t_min,

  with t(sigma) = t_fn(-2 log sigma). The sigma range is EDM's clipped to the schedule's over
  [t_min, t_max]: sigma_max' = min(sigma_max, sigma_edm(t_max)), sigma_min' = max(sigma_min,
  sigma_edm(t_min)); so the sampler starts (from pure noise) at sigma_max' = 80 rather than at
  t_max for the cosine and linear_beta schedules, as EDM does.
  """
  with jax.ensure_compile_time_eval():  # the ends are constants of the static settings
    ends = np.asarray(schedule.logsnr_fn(jnp.asarray([t_max, t_min], jnp.float32)), np.float64)
  if not np.all(np.isfinite(ends)):
    raise ValueError(
        f"time_grid='karras' needs a finite logsnr at t_max={t_max} and t_min={t_min}; the "
        f"schedule gives {ends.tolist()} (clip it at a logsnr_max)"
    )
  hi = min(sigma_max, float(np.exp(-0.5 * ends[0])))
  lo = max(sigma_min, float(np.exp(-0.5 * ends[1])))
  if not lo < hi:
    raise ValueError(
        f"time_grid='karras': the sigma range [{sigma_min}, {sigma_max}] clipped to the "
        f"schedule's [{np.exp(-0.5 * ends[1]):.4g}, {np.exp(-0.5 * ends[0]):.4g}] on t in "
        f"[{t_min}, {t_max}] is empty"
    )
  logsnrs = -2.0 * np.log(karras_sigmas(num_steps, lo, hi, rho))
  ts = jnp.asarray(schedule.t_fn(jnp.asarray(logsnrs, jnp.float32)), jnp.float32)
  ts = jnp.clip(ts, t_min, t_max)  # t_fn o logsnr_fn is the identity only to float32 rounding
  return jnp.concatenate([ts, jnp.full((1,), t_min, jnp.float32)])


def heun_step(
    predict: Predict,
    z_t: Array,
    x0_hat: Array,
    eps_hat: Array,
    logsnr_t: Array,
    logsnr_s: Array,
    last: Array,
) -> Array:
  """One step t -> s of EDM's Heun solver (Karras et al. 2022, Alg. 1, deterministic):

      Euler:      x' = x + (sigma_s - sigma_t) d,          d = eps_hat(x, t)
      corrector:  x_s = x + (sigma_s - sigma_t) (d + d') / 2,   d' = eps_hat(x', s)

  in EDM sigmas; in z (x = z / alpha, x' = x0_hat + sigma_s eps_hat):

      z' = alpha_s x0_hat + sigma_s eps_hat                       (= the DDIM step)
      z_s = z' + (sigma_s - alpha_s sigma_edm(t)) (eps_hat(z', s) - eps_hat) / 2.

  The corrector calls the network at s, so a step costs 2 calls; ``last`` (a traced bool)
  skips it through ``lax.cond``, as Alg. 1 does where sigma_{i+1} = 0, so N steps cost 2N - 1
  calls. ``predict`` returns the thresholded pair, so d' is consistent with the thresholded
  x0_hat. Shapes: tensors ``[B, H, W, C]``; logsnrs and ``last`` scalars.
  """
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  z_euler = alpha_s * x0_hat + sigma_s * eps_hat

  def correct(z):
    _, eps_s = predict(z, logsnr_s)
    return z + 0.5 * (sigma_s - alpha_s * edm_sigma(logsnr_t)) * (eps_s - eps_hat)

  return jax.lax.cond(last, lambda z: z, correct, z_euler)
