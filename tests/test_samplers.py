"""Samplers against exact answers (imagen_jax/diffusion/samplers.py).

Gaussian data x0 ~ N(MU, S^2 I) has the closed-form optimal eps predictor

    E[eps | z_t] = sigma (z_t - alpha MU) / (alpha^2 S^2 + sigma^2)     (elementwise),

and every sampler step is then *affine* in the Gaussian inputs, so the exact law of each
sampler's output (discretisation error included) follows from a float64 recursion on one
scalar per step (:func:`_reference`). The tests check three things:
  1. the float64 recursion's output std is within a stated discretisation budget of S
     (the sampler converges to the right answer at the given step count);
  2. the float32 samples match that exact law within 4 standard errors
     (SE(mean) = std/sqrt(n), SE(std) = std/sqrt(2n), n = number of iid pixels);
  3. for the deterministic samplers, every pixel equals the exact affine map of its initial
     noise (a much sharper check than moments).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import samplers as SM
from imagen_jax.diffusion.schedules import alpha_sigma, get_schedule

MU, S = 0.2, 0.25  # |x0| > 1 is 3.2 std away; irrelevant anyway: threshold="none"
SHAPE = (64, 16, 16, 3)  # n = 49152 iid pixels (the analytic denoiser is elementwise)
N_PIX = math.prod(SHAPE)
COSINE = get_schedule("cosine")
# `sample` under jit, as users run it; the Gaussian tests share its compile cache (eta, rng,
# noise are traced; a module-level denoiser closes over nothing).
_jsample = jax.jit(
    SM.sample,
    static_argnums=(0,),
    static_argnames=("sampler", "num_steps", "schedule", "threshold", "percentile"),
)


def gaussian_denoiser(z_t, logsnr, cond):
  """The Bayes-optimal eps_hat for x0 ~ N(MU, S^2) elementwise; ``cond`` is unused."""
  del cond
  alpha, sigma = alpha_sigma(logsnr.reshape(-1, 1, 1, 1))
  return sigma * (z_t - alpha * MU) / (alpha * alpha * S * S + sigma * sigma)


def _noise(seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=SHAPE), jnp.float32)


def _lambda_grid(schedule, num_steps):
  """float64 logSNR on the sampler's grid, from the closed forms (not the float32 code)."""
  t = np.linspace(1.0, 0.0, num_steps + 1)
  if schedule == "cosine":
    b = math.atan(math.exp(-20.0 / 2))
    a = math.atan(math.exp(20.0 / 2)) - b
    return -2.0 * np.log(np.tan(b + a * t))
  g = 0.1 * t + 0.5 * (0.02 - 1e-4) * 1000 * t**2  # -log alpha_bar, linear beta
  with np.errstate(divide="ignore"):
    return np.minimum(-np.log(np.expm1(g)), 20.0)


def _reference(sampler, num_steps, eta=0.0, schedule="cosine"):
  """Exact output law, float64: out = MU + A * (xi0 - alpha_0 MU) + (independent N(0, V)).

  Written from the step equations in centred coordinates y_t = z_t - alpha_t MU, in which the
  optimal x0_hat - MU = k_t y_t with k_t = alpha_t S^2 / (alpha_t^2 S^2 + sigma_t^2).
  Returns (A, V): the coefficient on the initial noise and the variance injected by the
  stochastic steps (0 for deterministic samplers).
  """
  lam = _lambda_grid(schedule, num_steps)
  al, si = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
  k = al * S * S / (al * al * S * S + si * si)
  coef, var, coef_prev = 1.0, 0.0, 0.0  # y_t = coef * xi0 + N(0, var)
  for i in range(num_steps - 1):
    s_, t_ = i + 1, i
    c = 1.0 - math.exp(lam[t_] - lam[s_])
    eps_gain = (1.0 - al[t_] * k[t_]) / si[t_]  # eps_hat = eps_gain * y_t
    if sampler in ("ddim", "ddpm"):
      e = 1.0 if sampler == "ddpm" else eta
      gain = al[s_] * k[t_] + si[s_] * math.sqrt(1.0 - e * e * c) * eps_gain
      coef, var = gain * coef, gain * gain * var + e * e * si[s_] ** 2 * c
    else:  # DPM-Solver++(2M)
      h = 0.5 * (lam[s_] - lam[t_])
      kk = 0.0 if i == 0 else 0.5 * h / (0.5 * (lam[t_] - lam[t_ - 1]))
      d_now, d_prev = (1 + kk) * k[t_] * coef, kk * k[t_ - 1] * coef_prev if i else 0.0
      coef_prev, coef = coef, si[s_] / si[t_] * coef - al[s_] * math.expm1(-h) * (d_now - d_prev)
  last = num_steps - 1
  return k[last] * coef, k[last] ** 2 * var


# (sampler, num_steps, eta, discretisation budget on |std_exact / S - 1|). The budgets are what
# the exact recursion gives for the uniform-t cosine grid (-0.7%, -2.6%, -1.2%, -6.0%), rounded
# up: DDPM and DDIM are first order (error halves when steps double; DDPM also drops the
# Var(x0 | z_t) term of the true reverse kernel), DPM-Solver++(2M) is second order.
CASES = [
    ("ddpm", 1000, 0.0, 0.01, "cosine"),
    ("ddim", 100, 0.0, 0.03, "cosine"),
    ("dpmpp_2m", 25, 0.0, 0.015, "cosine"),
    ("ddim", 100, 1.0, 0.07, "cosine"),
]


@pytest.mark.parametrize("sampler,num_steps,eta,budget,schedule", CASES)
def test_gaussian_data_moments(sampler, num_steps, eta, budget, schedule):
  coef, var = _reference(sampler, num_steps, eta, schedule)
  std_exact = math.sqrt(coef * coef + var)
  assert abs(std_exact / S - 1.0) < budget, f"discretisation error {std_exact / S - 1:.4f}"
  noise = _noise()
  out = np.asarray(
      _jsample(
          gaussian_denoiser,
          None,
          noise,
          jax.random.PRNGKey(1),
          sampler=sampler,
          num_steps=num_steps,
          schedule=get_schedule(schedule),
          eta=eta,
          threshold="none",
      ),
      np.float64,
  )
  assert out.shape == SHAPE and np.all(np.isfinite(out))
  # The mean is exact for every sampler here (each step maps E[z] = alpha MU to alpha MU); the
  # only offset is the prior's alpha(t_max) MU ~ 1e-5.
  se_mean, se_std = std_exact / math.sqrt(N_PIX), std_exact / math.sqrt(2 * N_PIX)
  alpha_max = math.sqrt(1 / (1 + math.exp(-_lambda_grid(schedule, 1)[0])))
  assert abs(out.mean() - MU) < 4 * se_mean + 1e-4 + abs(coef) * alpha_max * MU
  assert abs(out.std() - std_exact) < 4 * se_std + 1e-4
  # And so against the data distribution itself: within 4 SE plus the discretisation budget.
  assert abs(out.std() - S) < 4 * se_std + budget * S
  if var == 0.0:
    _assert_exact_affine_map(out, noise, coef, num_steps, alpha_max)


ALPHA_T_MAX = math.exp(-10.0)  # alpha(t_max) of the cosine schedule at logsnr -20


def _assert_exact_affine_map(out, noise, coef, num_steps, alpha0=ALPHA_T_MAX):
  """Deterministic samplers: every pixel is MU + coef * (noise - alpha(t_max) MU)."""
  ref = MU + coef * (np.asarray(noise, np.float64) - alpha0 * MU)
  # float32: the first x0_hat at logsnr = -20 divides by alpha = 4.5e-5, so it carries ~1e-3
  # absolute rounding error, which the next step multiplies by alpha_s (<= 0.3 for N >= 4);
  # the later steps add ~1e-6 each.
  np.testing.assert_allclose(out, ref, atol=1e-4 * max(1, num_steps / 10) + 3e-4)


@pytest.mark.parametrize("schedule,num_steps", [("cosine", 4), ("linear_beta", 25)])
def test_dpmpp_exact_affine_map(schedule, num_steps):
  # cosine, 4 steps: large, unequal logSNR steps exercise the multistep ratio r = h_prev / h.
  # linear_beta (SR1024; logsnr(1) = -10.05): the schedule's wiring into the sampler, and the
  # prior mismatch (z_1 = noise ignores alpha(1) MU = 1.3e-3). On the uniform-t grid this
  # schedule's last network call is at logsnr 3.9 (t = 0.04), so 25 steps give std 13% low;
  # that is discretisation, which this test does not judge (see the module docstring).
  noise = _noise(2)[:8]
  out = SM.sample(
      gaussian_denoiser,
      None,
      noise,
      None,
      sampler="dpmpp_2m",
      num_steps=num_steps,
      schedule=schedule,
      threshold="none",
  )
  coef, var = _reference("dpmpp_2m", num_steps, schedule=schedule)
  assert var == 0.0 and abs(coef / S - 1) > 0.05  # visibly off, but exactly so
  alpha_max = math.sqrt(1 / (1 + math.exp(-_lambda_grid(schedule, 1)[0])))
  _assert_exact_affine_map(np.asarray(out), noise, coef, num_steps, alpha_max)


# The next two tests reuse the shapes and static settings of test_gaussian_data_moments, so
# _jsample's cache serves them without new compiles (rng, noise, eta, gamma are traced).
def test_ddim_eta0_deterministic_and_ignores_rng():
  noise = _noise()
  kw = dict(sampler="ddim", num_steps=100, schedule=COSINE, threshold="none")
  a = _jsample(gaussian_denoiser, None, noise, jax.random.PRNGKey(0), eta=0.0, **kw)
  b = _jsample(gaussian_denoiser, None, noise, jax.random.PRNGKey(123), eta=0.0, **kw)
  np.testing.assert_array_equal(a, b)
  k = jax.random.PRNGKey(0)
  assert not np.allclose(a, _jsample(gaussian_denoiser, None, _noise(4), k, eta=0.0, **kw))
  # The stochastic sampler does use the key.
  c = _jsample(gaussian_denoiser, None, noise, jax.random.PRNGKey(0), eta=1.0, **kw)
  d = _jsample(gaussian_denoiser, None, noise, jax.random.PRNGKey(1), eta=1.0, **kw)
  assert not np.allclose(c, d)


def test_ddpm_equals_ddim_eta1_and_gamma_adds_variance():
  noise, key = _noise(), jax.random.PRNGKey(1)
  kw = dict(num_steps=100, schedule=COSINE, threshold="none")
  cold = _jsample(gaussian_denoiser, None, noise, key, sampler="ddpm", **kw)
  ddim1 = _jsample(gaussian_denoiser, None, noise, key, sampler="ddim", eta=1.0, **kw)
  np.testing.assert_allclose(cold, ddim1, atol=1e-5)
  hot = _jsample(gaussian_denoiser, None, noise, key, sampler="ddpm", gamma=1.0, **kw)
  assert float(jnp.std(hot)) > float(jnp.std(cold)) + 0.01  # forward variance > posterior
  with pytest.raises(ValueError, match="pass a PRNG key"):
    SM.sample(gaussian_denoiser, None, noise, None, sampler="ddpm", **kw)


def test_thresholding_applied_every_step_and_output_in_range():
  # Data far outside [-1, 1] (mean 3, std 2): with thresholding on, the output must land in
  # [-1, 1] even though the unthresholded sampler would return values around 3.
  def big_denoiser(z_t, logsnr, cond):
    del cond
    alpha, sigma = alpha_sigma(logsnr.reshape(-1, 1, 1, 1))
    mu, s = 3.0, 2.0
    return sigma * (z_t - alpha * mu) / (alpha * alpha * s * s + sigma * sigma)

  noise = _noise(6)[:4]
  for sampler, mode in [
      ("ddpm", "dynamic"),
      ("ddim", "dynamic"),
      ("dpmpp_2m", "dynamic"),
      ("dpmpp_2m", "static"),
  ]:
    out = SM.sample(
        big_denoiser,
        None,
        noise,
        jax.random.PRNGKey(0),
        sampler=sampler,
        num_steps=10,
        schedule=COSINE,
        threshold=mode,
        eta=0.5,
    )
    assert float(jnp.max(jnp.abs(out))) <= 1.0 + 1e-6, (mode, sampler)
    # The output is the last thresholded x0_hat. Static clipping saturates most pixels of
    # N(3, 2^2) at +1; dynamic thresholding at p = 99.5 rescales, so only the ~0.5% of pixels
    # above the percentile (4 of 768 per sample) reach |x| = 1.
    saturated = float(jnp.mean(jnp.abs(out) >= 1.0 - 1e-6))
    if mode == "dynamic":
      assert saturated <= 0.01, (sampler, saturated)
    else:
      assert saturated >= 0.3, (sampler, saturated)


def test_one_scan_compile_and_jit_compatibility():
  noise = _noise(7)[:4]
  calls = {"n": 0}

  def counting(z_t, logsnr, cond):
    calls["n"] += 1  # Python side effect: counts traces
    return gaussian_denoiser(z_t, logsnr, cond)

  eager = SM.sample(
      counting,
      None,
      noise,
      jax.random.PRNGKey(0),
      sampler="ddim",
      num_steps=37,
      schedule=COSINE,
      threshold="dynamic",
  )
  assert calls["n"] == 1, "the reverse loop must be one lax.scan (one trace of the network)"

  # denoise_fn itself jitted.
  out1 = SM.sample(
      jax.jit(gaussian_denoiser),
      None,
      noise,
      jax.random.PRNGKey(0),
      sampler="ddim",
      num_steps=37,
      schedule="cosine",
      threshold="dynamic",
  )
  np.testing.assert_allclose(out1, eager, atol=1e-5)
  # sample itself jitted with static sampler / num_steps / schedule / threshold / percentile;
  # eta, t_min and t_max traced.
  jsample = jax.jit(
      SM.sample,
      static_argnums=(0,),
      static_argnames=("sampler", "num_steps", "schedule", "threshold", "percentile"),
  )
  out2 = jsample(
      gaussian_denoiser,
      None,
      noise,
      jax.random.PRNGKey(0),
      sampler="ddim",
      num_steps=37,
      schedule=COSINE,
      threshold="dynamic",
      percentile=99.5,
      eta=jnp.float32(0.0),
      t_min=jnp.float32(0.0),
      t_max=jnp.float32(1.0),
  )
  np.testing.assert_allclose(out2, eager, atol=1e-5)


def test_cond_is_passed_through_and_logsnr_is_per_example():
  seen = {}

  def net(z_t, logsnr, cond):
    seen["logsnr_shape"], seen["cond"] = logsnr.shape, cond
    return jnp.zeros_like(z_t) + cond["bias"].reshape(-1, 1, 1, 1)

  noise = _noise(8)[:3]
  # rng may be None for the deterministic samplers.
  SM.sample(
      net,
      {"bias": jnp.zeros(3)},
      noise,
      None,
      sampler="dpmpp_2m",
      num_steps=3,
      schedule="linear_beta",
      threshold="static",
  )
  assert seen["logsnr_shape"] == (3,)
  assert set(seen["cond"]) == {"bias"}


def test_sample_errors():
  noise = _noise(9)[:2]
  kw = dict(num_steps=4, schedule=COSINE)
  with pytest.raises(ValueError, match="unknown sampler 'euler'.*ddpm"):
    SM.sample(gaussian_denoiser, None, noise, jax.random.PRNGKey(0), sampler="euler", **kw)
  with pytest.raises(ValueError, match="num_steps must be a static int >= 1, got 0"):
    SM.sample(
        gaussian_denoiser,
        None,
        noise,
        jax.random.PRNGKey(0),
        sampler="ddim",
        num_steps=0,
        schedule=COSINE,
    )
  with pytest.raises(ValueError, match="unknown threshold mode 'clip'"):
    SM.sample(
        gaussian_denoiser,
        None,
        noise,
        jax.random.PRNGKey(0),
        sampler="ddim",
        threshold="clip",
        **kw,
    )
  with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\].*got 100.5"):
    SM.sample(
        gaussian_denoiser,
        None,
        noise,
        jax.random.PRNGKey(0),
        sampler="ddim",
        percentile=100.5,
        **kw,
    )
  with pytest.raises(ValueError, match="eta must be in"):
    SM.sample(gaussian_denoiser, None, noise, jax.random.PRNGKey(0), sampler="ddim", eta=1.5, **kw)
  with pytest.raises(ValueError, match="t_min=0.5, t_max=0.2"):
    SM.sample(
        gaussian_denoiser,
        None,
        noise,
        jax.random.PRNGKey(0),
        sampler="ddim",
        t_min=0.5,
        t_max=0.2,
        **kw,
    )
