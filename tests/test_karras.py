"""EDM sampling against exact answers (imagen_jax/diffusion/karras.py, samplers "heun",
"euler_ancestral", time_grid "karras").

References, all float64 and written in EDM's variables (x = z / alpha, sigma = exp(-logsnr / 2),
Karras et al. 2022), independent of the z-space code under test:
  * the Karras grid from Eq. 5;
  * Heun (Alg. 1) on Gaussian data x0 ~ N(MU, S^2), whose denoiser D(x; sigma) = MU +
    S^2 / (S^2 + sigma^2) (x - MU) is affine, so the output is exactly MU + A (noise - alpha_0 MU)
    with A from a scalar recursion (as in tests/test_samplers.py);
  * k-diffusion's Euler ancestral, run step by step on the same per-step noise.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import karras
from imagen_jax.diffusion import samplers as SM
from imagen_jax.diffusion.schedules import get_schedule
from tests.test_samplers import (
    MU,
    N_PIX,
    SHAPE,
    S,
    _assert_exact_affine_map,
    _karras_lambdas,
    _logsnr64,
    _noise,
    _reference,
    gaussian_denoiser,
)

_jsample = jax.jit(SM.sample, static_argnums=(0,), static_argnames=("schedule", "settings"))


def _alpha(lam):
  return math.sqrt(1.0 / (1.0 + math.exp(-lam)))


def _gaussian_d(x, sigma):
  """EDM denoiser of N(MU, S^2) data: E[x0 | x0 + sigma n = x]."""
  return MU + S * S / (S * S + sigma * sigma) * (x - MU)


def _heun_reference(lam):
  """A of out = MU + A (noise - alpha_0 MU) for Heun on the grid ``lam`` [N + 1] (EDM Alg. 1)."""
  n = len(lam) - 1
  se = np.exp(-0.5 * lam)
  coef = 1.0 / _alpha(lam[0])  # y_0 = x_0 - MU = (noise - alpha_0 MU) / alpha_0
  for i in range(n - 1):
    d0 = se[i] / (S * S + se[i] ** 2)  # d(y) = (y - (D - MU)) / sigma = d0 * y
    d1 = se[i + 1] / (S * S + se[i + 1] ** 2)
    euler = 1.0 + (se[i + 1] - se[i]) * d0
    coef *= 1.0 + 0.5 * (se[i + 1] - se[i]) * (d0 + d1 * euler)
  return S * S / (S * S + se[n - 1] ** 2) * coef  # the last step: Euler to sigma = 0, i.e. D


@pytest.mark.parametrize("schedule", ["cosine", "linear_beta"])
def test_karras_grid_is_eq5_clipped_to_the_schedule(schedule):
  sched = get_schedule(schedule)
  s = SM.SamplerSettings(num_steps=10, time_grid="karras")
  t = np.asarray(SM.time_grid(sched, s))
  assert t.shape == (11,) and t.dtype == np.float32 and t[-1] == 0.0 and np.all(np.diff(t) < 0)
  lam = np.asarray(sched.logsnr_fn(jnp.asarray(t)), np.float64)
  np.testing.assert_allclose(lam[:-1], _karras_lambdas(schedule, 10)[:-1], atol=2e-4)
  sig = np.exp(-0.5 * lam[:-1])  # EDM's defaults: both schedules span more than [0.002, 80]
  np.testing.assert_allclose(sig[[0, -1]], [80.0, 0.002], rtol=1e-4)
  # rho = 7: sigma^(1/7) is uniform, so steps are dense at low noise (Eq. 5).
  np.testing.assert_allclose(np.diff(sig ** (1 / 7)), np.diff(sig ** (1 / 7))[0], rtol=1e-3)
  # A range wider than the schedule's is clipped to it: t_max = 0.5 caps sigma at sigma(0.5).
  wide = SM.SamplerSettings(num_steps=4, time_grid="karras", sigma_max=1e6, t_max=0.5)
  t_wide = np.asarray(SM.time_grid(sched, wide))
  assert t_wide[0] == pytest.approx(0.5, abs=1e-6)
  sig_top = math.exp(-0.5 * _logsnr64(schedule, 0.5))
  lam_w = np.asarray(sched.logsnr_fn(jnp.asarray(t_wide[:-1])), np.float64)
  np.testing.assert_allclose(
      np.exp(-0.5 * lam_w), karras.karras_sigmas(4, 0.002, sig_top, 7.0), rtol=2e-4
  )


def test_karras_sigmas_and_grid_errors():
  np.testing.assert_allclose(karras.karras_sigmas(3, 1.0, 8.0, 1.0), [8.0, 4.5, 1.0])
  np.testing.assert_allclose(karras.karras_sigmas(1, 0.002, 80.0, 7.0), [80.0])
  with pytest.raises(ValueError, match="is empty"):
    SM.time_grid("cosine", SM.SamplerSettings(time_grid="karras", t_max=0.001))
  with pytest.raises(ValueError, match="sigma_min=0.01 is the karras grid's.*'uniform_t'"):
    SM.SamplerSettings(sigma_min=0.01)
  with pytest.raises(ValueError, match="need sigma_min < sigma_max"):
    SM.SamplerSettings(time_grid="karras", sigma_min=5.0, sigma_max=1.0)
  with pytest.raises(ValueError, match="rho must be > 0"):
    SM.SamplerSettings(time_grid="karras", rho=0.0)


@pytest.mark.parametrize("num_steps,budget", [(50, 0.01), (10, None)])
def test_heun_karras_gaussian_exact(num_steps, budget):
  # EDM's Heun on its own grid: 2nd order (+3.3% at 25 steps, +0.75% at 50; Euler = DDIM on the
  # same grid is -12% and -6%). At 10 steps it is visibly off (+27%), but exactly so.
  lam = _karras_lambdas("cosine", num_steps)
  coef = _heun_reference(lam)
  settings = SM.SamplerSettings(
      sampler="heun", num_steps=num_steps, time_grid="karras", threshold="none"
  )
  noise = _noise(12) if budget else _noise(12)[:4]
  out = np.asarray(
      _jsample(gaussian_denoiser, None, noise, None, schedule="cosine", settings=settings),
      np.float64,
  )
  if budget:
    assert abs(coef / S - 1) < budget, f"discretisation error {coef / S - 1:.4f}"
    assert abs(out.std() - S) < 4 * coef / math.sqrt(2 * N_PIX) + budget * S
  else:
    assert abs(coef / S - 1) > 0.2
  _assert_exact_affine_map(out, noise, coef, num_steps, _alpha(lam[0]))


def test_euler_on_karras_grid_is_ddim():
  # Euler on EDM's ODE, written in EDM variables, against the z-space DDIM recursion.
  lam = _karras_lambdas("linear_beta", 12)
  se, coef = np.exp(-0.5 * lam), 1.0 / _alpha(lam[0])
  for i in range(11):
    coef *= 1.0 + (se[i + 1] - se[i]) * se[i] / (S * S + se[i] ** 2)
  coef *= S * S / (S * S + se[11] ** 2)
  ddim, _ = _reference("ddim", 12, schedule="linear_beta", grid="karras")
  assert coef == pytest.approx(ddim, rel=1e-12)


def test_heun_network_calls_are_2n_minus_1():
  calls = []

  def counting(z_t, logsnr, cond):
    jax.debug.callback(lambda lam: calls.append(float(lam[0])), logsnr)
    return gaussian_denoiser(z_t, logsnr, cond)

  settings = SM.SamplerSettings(sampler="heun", num_steps=6, time_grid="karras")
  assert settings.network_calls == 11 and SM.SamplerSettings(num_steps=6).network_calls == 6
  SM.sample(counting, None, _noise(13)[:2], None, schedule="cosine", settings=settings)
  jax.effects_barrier()
  assert len(calls) == 11
  # Each grid point but the end is called; the interior ones twice (step start and corrector).
  grid = np.asarray(get_schedule("cosine").logsnr_fn(SM.time_grid("cosine", settings)))
  want = sorted([grid[0]] + [g for g in grid[1:-1] for _ in range(2)])
  np.testing.assert_allclose(sorted(calls), want, rtol=1e-6)


def test_heun_thresholds_every_call():
  def big(z_t, logsnr, cond):  # N(3, 2^2) data: far outside [-1, 1]
    del cond
    a = jnp.sqrt(jax.nn.sigmoid(logsnr)).reshape(-1, 1, 1, 1)
    s = jnp.sqrt(jax.nn.sigmoid(-logsnr)).reshape(-1, 1, 1, 1)
    return s * (z_t - a * 3.0) / (a * a * 4.0 + s * s)

  settings = SM.SamplerSettings(sampler="heun", num_steps=8, time_grid="karras")
  out = SM.sample(big, None, _noise(14)[:2], None, schedule="cosine", settings=settings)
  assert float(jnp.max(jnp.abs(out))) <= 1.0 + 1e-6


def test_euler_ancestral_is_k_diffusion_euler_ancestral():
  """k-diffusion's ``sample_euler_ancestral`` (eta = 1) in EDM variables, step by step."""
  n, key = 8, jax.random.PRNGKey(3)
  settings = SM.SamplerSettings(sampler="euler_ancestral", num_steps=n, time_grid="karras")
  assert settings.needs_noise
  noise = _noise(15)[:2]
  got = SM.sample(gaussian_denoiser, None, noise, key, schedule="cosine", settings=settings)
  lam = np.asarray(get_schedule("cosine").logsnr_fn(SM.time_grid("cosine", settings)), np.float64)
  sig = np.exp(-0.5 * lam[:-1])
  x = np.asarray(noise, np.float64) / _alpha(lam[0])
  for i in range(n):
    den = _gaussian_d(x, sig[i])
    if i == n - 1:  # to sigma = 0: sigma_up = sigma_down = 0
      x = den
      break
    s_from, s_to = sig[i], sig[i + 1]
    s_up = min(s_to, math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2))
    s_down = math.sqrt(s_to**2 - s_up**2)
    x = x + (x - den) / s_from * (s_down - s_from)
    step_noise = jax.random.normal(jax.random.fold_in(key, i), noise.shape, jnp.float32)
    x = x + np.asarray(step_noise, np.float64) * s_up
  np.testing.assert_allclose(np.asarray(got), x, atol=2e-4)


def test_euler_ancestral_gaussian_moments():
  coef, var = _reference("ddim", 50, eta=1.0, grid="karras")
  std_exact = math.sqrt(coef * coef + var)
  settings = SM.SamplerSettings(
      sampler="euler_ancestral", num_steps=50, time_grid="karras", threshold="none"
  )
  out = np.asarray(
      _jsample(
          gaussian_denoiser,
          None,
          _noise(16),
          jax.random.PRNGKey(2),
          schedule="cosine",
          settings=settings,
      ),
      np.float64,
  )
  assert out.shape == SHAPE
  assert abs(out.std() - std_exact) < 4 * std_exact / math.sqrt(2 * N_PIX) + 1e-4
  assert abs(out.mean() - MU) < 4 * std_exact / math.sqrt(N_PIX) + 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_karras_grid_serves_the_existing_samplers(sampler):
  coef, var = _reference(sampler, 25, grid="karras")
  assert var == 0.0
  settings = SM.SamplerSettings(sampler=sampler, num_steps=25, time_grid="karras", threshold="none")
  noise = _noise(17)[:4]
  out = SM.sample(gaussian_denoiser, None, noise, None, schedule="cosine", settings=settings)
  lam0 = _karras_lambdas("cosine", 25)[0]
  _assert_exact_affine_map(np.asarray(out, np.float64), noise, coef, 25, _alpha(lam0))
