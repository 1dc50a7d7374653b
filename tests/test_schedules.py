"""Closed-form checks of the noise schedules (imagen_jax/diffusion/schedules.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import schedules as S

T_GRID = np.linspace(0.0, 1.0, 2001, dtype=np.float32)


@pytest.mark.parametrize("logsnr", [-40.0, -20.0, -7.3, -1e-3, 0.0, 0.5, 13.0, 20.0, 40.0])
def test_alpha_sigma_unit_norm_and_logsnr(logsnr):
  alpha, sigma = S.alpha_sigma(jnp.float32(logsnr))
  assert alpha.dtype == jnp.float32 and sigma.dtype == jnp.float32
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  assert float(alpha) > 0 and float(sigma) > 0  # no underflow to exactly 0
  # logsnr = log(alpha^2 / sigma^2), checked in float64 from the float32 outputs.
  a, s = float(alpha), float(sigma)
  np.testing.assert_allclose(math.log(a * a / (s * s)), logsnr, atol=1e-3 + 1e-5 * abs(logsnr))


def test_alpha_sigma_keeps_shape():
  logsnr = jnp.linspace(-20, 20, 12).reshape(3, 4)
  alpha, sigma = S.alpha_sigma(logsnr)
  assert alpha.shape == sigma.shape == (3, 4)


@pytest.mark.parametrize("bounds", [(-20.0, 20.0), (-15.0, 10.0), (-5.0, 5.0)])
def test_cosine_endpoints_monotone_and_inverse(bounds):
  lo, hi = bounds
  logsnr = np.asarray(S.cosine_logsnr(T_GRID, logsnr_min=lo, logsnr_max=hi))
  assert logsnr[0] == pytest.approx(hi, abs=1e-5)
  assert logsnr[-1] == pytest.approx(lo, abs=1e-5)
  assert np.all(np.diff(logsnr) < 0), "cosine logsnr must be strictly decreasing in t"
  t_back = np.asarray(S.cosine_t(logsnr, logsnr_min=lo, logsnr_max=hi))
  np.testing.assert_allclose(t_back, T_GRID, atol=2e-6)


def test_cosine_matches_unshifted_formula_in_float64():
  # logsnr(t) = -2 log tan(b + a t) with the shifted angles, evaluated in float64 as reference.
  lo, hi = -20.0, 20.0
  b = math.atan(math.exp(-hi / 2))
  a = math.atan(math.exp(-lo / 2)) - b
  t = np.linspace(0, 1, 101)
  ref = -2 * np.log(np.tan(b + a * t))
  got = np.asarray(S.cosine_logsnr(t.astype(np.float32)))
  # float32 of t itself is ~6e-8 off; d logsnr/dt <= 2 a / (sin cos) ~ 7e4 at the very ends.
  np.testing.assert_allclose(got, ref, atol=5e-3, rtol=1e-5)
  # Away from the ends the derivative is O(1): much tighter.
  np.testing.assert_allclose(got[5:-5], ref[5:-5], atol=2e-5, rtol=1e-5)
  # Midpoint of the standard cosine schedule is logsnr = 0 (alpha = sigma).
  assert float(S.cosine_logsnr(jnp.float32(0.5))) == pytest.approx(0.0, abs=1e-5)


def test_linear_beta_matches_discrete_ddpm_schedule():
  # Continuous limit of prod(1 - beta_i): at t = n / T compare with the discrete alpha_bar.
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  alpha_bar = np.cumprod(1 - betas)
  n = np.array([10, 100, 300, 500, 800, 1000])
  discrete = np.log(alpha_bar[n - 1] / (1 - alpha_bar[n - 1]))
  cont = np.asarray(S.linear_beta_logsnr(jnp.asarray(n / 1000.0, jnp.float32)))
  # Dropped terms: sum beta_i^2 / 2 <= 0.07 and the Riemann-sum offset; the logsnr gap stays
  # below 0.1 everywhere (and is ~0.07 at t = 1).
  np.testing.assert_allclose(cont, discrete, atol=0.1)
  assert float(S.linear_beta_logsnr(jnp.float32(1.0))) == pytest.approx(
      -(0.1 + 0.5 * (0.02 - 1e-4) * 1000) - math.log1p(-math.exp(-10.05)), abs=1e-4
  )


def test_linear_beta_closed_form_monotone_inverse():
  t = T_GRID.astype(np.float64)
  g = 0.1 * t + 0.5 * (0.02 - 1e-4) * 1000 * t**2
  with np.errstate(divide="ignore"):
    ref = np.minimum(-np.log(np.expm1(g)), 20.0)
  got = np.asarray(S.linear_beta_logsnr(T_GRID))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  assert got[0] == 20.0  # clipped logsnr_max at t = 0
  assert np.all(np.diff(got) < 0)
  t_back = np.asarray(S.linear_beta_t(got))
  np.testing.assert_allclose(t_back[1:], T_GRID[1:], atol=2e-6, rtol=2e-6)
  assert float(S.linear_beta_t(jnp.float32(20.0))) < 1e-7  # t where the clip starts


def test_linear_beta_small_t_no_cancellation():
  # For tiny t, logsnr ~ -log(0.1 t); a naive log(alpha_bar/(1-alpha_bar)) in float32 fails here.
  t = jnp.asarray([1e-6, 1e-5, 1e-4], jnp.float32)
  np.testing.assert_allclose(
      S.linear_beta_logsnr(t),
      -np.log(np.expm1(0.1 * np.asarray(t, np.float64) + 9.95 * np.asarray(t, np.float64) ** 2)),
      rtol=1e-5,
  )
  np.testing.assert_allclose(S.linear_beta_t(S.linear_beta_logsnr(t)), t, rtol=1e-4)


def test_get_schedule_and_errors():
  sched = S.get_schedule("cosine", logsnr_min=-10.0)
  assert sched is S.get_schedule("cosine", logsnr_min=-10.0)  # cached: a stable jit static arg
  assert float(sched.logsnr_fn(jnp.float32(1.0))) == pytest.approx(-10.0, abs=1e-5)
  lb = S.get_schedule("linear_beta")
  np.testing.assert_allclose(lb.t_fn(lb.logsnr_fn(jnp.float32(0.3))), 0.3, atol=1e-6)
  with pytest.raises(ValueError, match="unknown schedule 'cosinus'.*cosine"):
    S.get_schedule("cosinus")
  with pytest.raises(ValueError, match="logsnr_min=5.0, logsnr_max=1.0"):
    S.get_schedule("cosine", logsnr_min=5.0, logsnr_max=1.0)
  with pytest.raises(ValueError, match="beta_start=0.1, beta_end=0.01"):
    S.linear_beta_logsnr(jnp.float32(0.5), beta_start=0.1, beta_end=0.01)


def test_schedules_jit_and_grad_finite():
  for sched in (S.get_schedule("cosine"), S.get_schedule("linear_beta")):
    f = jax.jit(sched.logsnr_fn)
    t = jnp.linspace(0.001, 0.999, 50)
    np.testing.assert_allclose(f(t), sched.logsnr_fn(t), rtol=1e-6, atol=1e-6)
    d = jax.vmap(jax.grad(sched.logsnr_fn))(t)
    assert np.all(np.isfinite(d)) and np.all(np.asarray(d) < 0)
