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
Both time grids are covered: the recursion takes the grid's logSNRs from the closed forms.
"""

import dataclasses
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
# `sample` under jit, as users run it; the Gaussian tests share its compile cache (rng and
# noise are traced, the settings static; a module-level denoiser closes over nothing).
_jsample = jax.jit(SM.sample, static_argnums=(0,), static_argnames=("schedule", "settings"))


def gaussian_denoiser(z_t, logsnr, cond):
  """The Bayes-optimal eps_hat for x0 ~ N(MU, S^2) elementwise; ``cond`` is unused."""
  del cond
  alpha, sigma = alpha_sigma(logsnr.reshape(-1, 1, 1, 1))
  return sigma * (z_t - alpha * MU) / (alpha * alpha * S * S + sigma * sigma)


def _noise(seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=SHAPE), jnp.float32)


def _settings(**kw):
  """SamplerSettings for the exact-Gaussian tests (no thresholding unless asked)."""
  return SM.SamplerSettings(**{"threshold": "none", **kw})


def _logsnr64(schedule, t):
  """float64 logSNR(t) from the closed forms (not the float32 code)."""
  t = np.asarray(t, np.float64)
  if schedule == "cosine":
    b = math.atan(math.exp(-20.0 / 2))
    a = math.atan(math.exp(20.0 / 2)) - b
    return np.clip(-2.0 * np.log(np.tan(b + a * t)), -20.0, 20.0)
  g = 0.1 * t + 0.5 * (0.02 - 1e-4) * 1000 * t**2  # -log alpha_bar, linear beta
  with np.errstate(divide="ignore"):
    return np.minimum(-np.log(np.expm1(g)), 20.0)


def _karras_lambdas(schedule, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
  """float64 logSNR of the Karras grid (Karras et al. 2022, Eq. 5) clipped to the schedule's
  sigma / alpha range on t in [0, 1]; the last point is t = 0 (the sampler's end)."""
  hi = min(sigma_max, math.exp(-0.5 * _logsnr64(schedule, 1.0)))
  lo = max(sigma_min, math.exp(-0.5 * _logsnr64(schedule, 0.0)))
  frac = np.linspace(0.0, 1.0, num_steps) if num_steps > 1 else np.zeros(1)
  sigmas = (hi ** (1 / rho) + frac * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
  return np.append(-2.0 * np.log(sigmas), _logsnr64(schedule, 0.0))


def _lambda_grid(schedule, num_steps, grid="uniform_t"):
  """float64 logSNR on the sampler's grid (t_min = 0, t_max = 1)."""
  if grid == "uniform_t":
    return _logsnr64(schedule, np.linspace(1.0, 0.0, num_steps + 1))
  if grid == "karras":
    return _karras_lambdas(schedule, num_steps)
  return np.linspace(_logsnr64(schedule, 1.0), _logsnr64(schedule, 0.0), num_steps + 1)


def _reference(sampler, num_steps, eta=0.0, schedule="cosine", grid="uniform_t"):
  """Exact output law, float64: out = MU + A * (xi0 - alpha_0 MU) + (independent N(0, V)).

  Written from the step equations in centred coordinates y_t = z_t - alpha_t MU, in which the
  optimal x0_hat - MU = k_t y_t with k_t = alpha_t S^2 / (alpha_t^2 S^2 + sigma_t^2).
  Returns (A, V): the coefficient on the initial noise and the variance injected by the
  stochastic steps (0 for deterministic samplers).
  """
  lam = _lambda_grid(schedule, num_steps, grid)
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
          schedule=get_schedule(schedule),
          settings=_settings(sampler=sampler, num_steps=num_steps, eta=eta),
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
  # that is discretisation, which this test does not judge (the logSNR-uniform grid removes
  # it: test_logsnr_uniform_grid_removes_linear_beta_bias).
  noise = _noise(2)[:8]
  out = SM.sample(
      gaussian_denoiser,
      None,
      noise,
      None,
      schedule=schedule,
      settings=_settings(sampler="dpmpp_2m", num_steps=num_steps),
  )
  coef, var = _reference("dpmpp_2m", num_steps, schedule=schedule)
  assert var == 0.0 and abs(coef / S - 1) > 0.05  # visibly off, but exactly so
  alpha_max = math.sqrt(1 / (1 + math.exp(-_lambda_grid(schedule, 1)[0])))
  _assert_exact_affine_map(np.asarray(out), noise, coef, num_steps, alpha_max)


# The next two tests reuse the shapes and static settings of test_gaussian_data_moments, so
# _jsample's cache serves them mostly without new compiles (rng and noise are traced).
def test_ddim_eta0_deterministic_and_ignores_rng():
  noise = _noise()
  kw = dict(schedule=COSINE)
  det, sto = _settings(num_steps=100, eta=0.0), _settings(num_steps=100, eta=1.0)
  a = _jsample(gaussian_denoiser, None, noise, jax.random.PRNGKey(0), settings=det, **kw)
  b = _jsample(gaussian_denoiser, None, noise, jax.random.PRNGKey(123), settings=det, **kw)
  np.testing.assert_array_equal(a, b)
  k = jax.random.PRNGKey(0)
  assert not np.allclose(a, _jsample(gaussian_denoiser, None, _noise(4), k, settings=det, **kw))
  # The stochastic sampler does use the key.
  c = _jsample(gaussian_denoiser, None, noise, jax.random.PRNGKey(0), settings=sto, **kw)
  d = _jsample(gaussian_denoiser, None, noise, jax.random.PRNGKey(1), settings=sto, **kw)
  assert not np.allclose(c, d)


def test_ddpm_equals_ddim_eta1_and_gamma_adds_variance():
  noise, key = _noise(), jax.random.PRNGKey(1)
  kw = dict(schedule=COSINE)

  def run(**s):
    return _jsample(
        gaussian_denoiser, None, noise, key, settings=_settings(num_steps=100, **s), **kw
    )

  cold = run(sampler="ddpm")
  ddim1 = run(sampler="ddim", eta=1.0)
  np.testing.assert_allclose(cold, ddim1, atol=1e-5)
  hot = run(sampler="ddpm", gamma=1.0)
  assert float(jnp.std(hot)) > float(jnp.std(cold)) + 0.01  # forward variance > posterior
  with pytest.raises(ValueError, match="pass a PRNG key"):
    SM.sample(gaussian_denoiser, None, noise, None, settings=_settings(sampler="ddpm"), **kw)


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
    # eta is DDIM's knob only (the settings reject it elsewhere).
    eta = 0.5 if sampler == "ddim" else 0.0
    settings = SM.SamplerSettings(sampler=sampler, num_steps=10, threshold=mode, eta=eta)
    out = SM.sample(
        big_denoiser, None, noise, jax.random.PRNGKey(0), schedule=COSINE, settings=settings
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


def test_logsnr_uniform_grid_removes_linear_beta_bias():
  # linear_beta at 25 DPM-Solver++(2M) steps: on the uniform-t grid the last network call is at
  # logsnr 3.9, so the output std is 13% low; the logSNR-uniform grid's last call is at logsnr
  # 18.8 and the exact recursion's std is +2.0% off (the solver's own discretisation error).
  coef_t, _ = _reference("dpmpp_2m", 25, schedule="linear_beta", grid="uniform_t")
  coef, var = _reference("dpmpp_2m", 25, schedule="linear_beta", grid="logsnr_uniform")
  assert coef_t / S - 1 < -0.12 and var == 0.0
  assert abs(coef / S - 1) < 0.025, f"discretisation error {coef / S - 1:.4f}"
  noise = _noise(3)
  settings = _settings(sampler="dpmpp_2m", num_steps=25, time_grid="logsnr_uniform")
  out = np.asarray(
      SM.sample(gaussian_denoiser, None, noise, None, schedule="linear_beta", settings=settings),
      np.float64,
  )
  se_std = abs(coef) / math.sqrt(2 * N_PIX)
  assert abs(out.std() - S) < 4 * se_std + 0.025 * S
  assert abs(out.std() - S) < 0.2 * abs(coef_t - S)  # the bias is gone, not just smaller
  alpha_max = math.sqrt(1 / (1 + math.exp(-_logsnr64("linear_beta", 1.0))))
  _assert_exact_affine_map(out, noise, coef, 25, alpha_max)


@pytest.mark.parametrize("schedule", ["cosine", "linear_beta"])
def test_time_grid(schedule):
  sched = get_schedule(schedule)
  s = SM.SamplerSettings(num_steps=8, t_min=0.0, t_max=1.0)
  np.testing.assert_array_equal(
      SM.time_grid(sched, s), jnp.linspace(jnp.float32(1.0), jnp.float32(0.0), 9)
  )
  s = SM.SamplerSettings(num_steps=8, time_grid="logsnr_uniform", t_min=0.05, t_max=0.9)
  t = np.asarray(SM.time_grid(schedule, s))
  assert t.shape == (9,) and t.dtype == np.float32 and t[0] == np.float32(0.9)
  assert t[-1] == np.float32(0.05) and np.all(np.diff(t) < 0)
  lam = _logsnr64(schedule, t)
  np.testing.assert_allclose(np.diff(lam), (lam[-1] - lam[0]) / 8, rtol=1e-4)
  # At t_min = 0 the grid ends at the schedule's finite logsnr_max = 20.
  t0 = SM.time_grid(sched, dataclasses.replace(s, t_min=0.0))
  lam_max = float(sched.logsnr_fn(jnp.float32(0.9)))
  assert t0[-1] == 0.0
  assert float(sched.logsnr_fn(t0[-2])) == pytest.approx(20.0 - (20.0 - lam_max) / 8, abs=1e-3)
  # A schedule without that clip is refused, naming the bad ends.
  unclipped = get_schedule("cosine")._replace(logsnr_fn=lambda t: -2.0 * jnp.log(jnp.tan(t)))
  with pytest.raises(ValueError, match="finite logsnr.*t_min=0.0"):
    SM.time_grid(unclipped, dataclasses.replace(s, t_min=0.0))


def _uniform_t_formula(denoise_fn, cond, noise, rng, schedule, sampler, num_steps, eta):
  """The uniform-t reverse process written out from the step functions, as one lax.scan.

  t_i = 1 - i / N; step i moves z from t_i to t_{i+1} (a stochastic step draws
  normal(fold_in(rng, i))) and the last step returns x0_hat. A scan, like the sampler, so that
  XLA compiles the same arithmetic (an unrolled eager loop rounds differently in the last bit).
  """
  logsnrs = schedule.logsnr_fn(jnp.linspace(jnp.float32(1.0), jnp.float32(0.0), num_steps + 1))

  def body(carry, xs):
    z, x0_prev, lp = carry
    i, lt, ls = xs
    x0, eps = SM.predict_x0_eps(denoise_fn, z, lt, cond, threshold="dynamic")
    if sampler == "ddim":
      noise_i = jax.random.normal(jax.random.fold_in(rng, i), z.shape, jnp.float32)
      z_next = SM.ddim_step(z, x0, eps, lt, ls, jnp.float32(eta), noise_i)
    else:
      z_next = SM.dpmpp_2m_step(z, x0, x0_prev, lp, lt, ls, i == 0)
    return (jnp.where(i == num_steps - 1, x0, z_next), x0, lt), None

  steps = jnp.arange(num_steps, dtype=jnp.int32)
  init = (noise, jnp.zeros_like(noise), logsnrs[0])
  return jax.lax.scan(body, init, (steps, logsnrs[:-1], logsnrs[1:]))[0][0]


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.5), ("dpmpp_2m", 0.0)])
def test_uniform_t_matches_the_step_formula_bit_for_bit(sampler, eta):
  noise, key, sched = _noise(10)[:4], jax.random.PRNGKey(5), get_schedule("linear_beta")
  settings = SM.SamplerSettings(sampler=sampler, num_steps=6, eta=eta)
  got = SM.sample(gaussian_denoiser, None, noise, key, schedule=sched, settings=settings)
  want = _uniform_t_formula(gaussian_denoiser, None, noise, key, sched, sampler, 6, eta)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_one_scan_compile_and_jit_compatibility():
  noise = _noise(7)[:4]
  calls = {"n": 0}

  def counting(z_t, logsnr, cond):
    calls["n"] += 1  # Python side effect: counts traces
    return gaussian_denoiser(z_t, logsnr, cond)

  settings = SM.SamplerSettings(sampler="ddim", num_steps=37, threshold="dynamic")
  eager = SM.sample(
      counting, None, noise, jax.random.PRNGKey(0), schedule=COSINE, settings=settings
  )
  assert calls["n"] == 1, "the reverse loop must be one lax.scan (one trace of the network)"

  # denoise_fn itself jitted.
  fn = jax.jit(gaussian_denoiser)
  out1 = SM.sample(fn, None, noise, jax.random.PRNGKey(0), schedule="cosine", settings=settings)
  np.testing.assert_allclose(out1, eager, atol=1e-5)
  # sample itself jitted with the schedule and the (hashable) settings static.
  jsample = jax.jit(SM.sample, static_argnums=(0,), static_argnames=("schedule", "settings"))
  out2 = jsample(
      gaussian_denoiser, None, noise, jax.random.PRNGKey(0), schedule=COSINE, settings=settings
  )
  np.testing.assert_allclose(out2, eager, atol=1e-5)
  # Equal settings are equal static arguments: no retrace.
  same = SM.SamplerSettings(sampler="ddim", num_steps=37, percentile=99.5)
  assert same == settings and hash(same) == hash(settings)


def test_callback_once_per_step_and_free_when_absent():
  noise, n = _noise(11)[:2], 5
  seen = []
  settings = SM.SamplerSettings(sampler="dpmpp_2m", num_steps=n, time_grid="logsnr_uniform")
  out = SM.sample(
      gaussian_denoiser, None, noise, None, schedule=COSINE, settings=settings, callback=seen.append
  )
  jax.effects_barrier()
  assert len(seen) == n
  seen.sort(key=lambda d: int(d["i"]))
  assert [int(d["i"]) for d in seen] == list(range(n))
  assert set(seen[0]) == {"i", "t", "logsnr", "x", "denoised"}
  for d in seen:
    assert d["x"].shape == d["denoised"].shape == noise.shape and np.shape(d["t"]) == ()
  t = SM.time_grid(COSINE, settings)
  np.testing.assert_allclose([float(d["t"]) for d in seen], t[:-1])
  np.testing.assert_array_equal(seen[0]["x"], noise)  # step 0 sees the initial noise
  np.testing.assert_array_equal(seen[-1]["denoised"], out)  # the output is the last x0_hat

  def jaxpr(callback):
    return str(
        jax.make_jaxpr(
            lambda z: SM.sample(
                gaussian_denoiser,
                None,
                z,
                None,
                schedule=COSINE,
                settings=settings,
                callback=callback,
            )
        )(noise)
    )

  assert "debug_callback" in jaxpr(seen.append) and "debug_callback" not in jaxpr(None)


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
      schedule="linear_beta",
      settings=SM.SamplerSettings(sampler="dpmpp_2m", num_steps=3, threshold="static"),
  )
  assert seen["logsnr_shape"] == (3,)
  assert set(seen["cond"]) == {"bias"}


@pytest.mark.parametrize(
    "kw,error,match",
    [
        (dict(sampler="euler"), ValueError, "unknown sampler 'euler'.*ddpm"),
        (dict(num_steps=0), ValueError, "num_steps must be a static int >= 1, got 0"),
        (dict(num_steps=2.0), ValueError, "num_steps must be a static int >= 1, got 2.0"),
        (dict(threshold="clip"), ValueError, "unknown threshold mode 'clip'"),
        (dict(percentile=100.5), ValueError, r"percentile must be in \(0, 100\].*got 100.5"),
        (dict(eta=1.5), ValueError, "eta must be in"),
        (dict(eta=jnp.float32(0.5)), TypeError, "eta must be a static Python number"),
        (dict(sampler="ddpm", eta=0.5), ValueError, "eta=0.5 is DDIM's.*'ddpm' needs eta=0"),
        (dict(gamma=1.0), ValueError, "gamma=1.0 is DDPM's.*'ddim' needs gamma=0"),
        (dict(max_scale=0.5), ValueError, "max_scale must be >= 1 or None.*got 0.5"),
        (dict(time_grid="sqrt_t"), ValueError, "unknown time_grid 'sqrt_t'.*karras"),
        (dict(t_min=0.5, t_max=0.2), ValueError, "t_min=0.5, t_max=0.2"),
        (dict(t_max=1.5), ValueError, "t_min=0.0, t_max=1.5"),
    ],
)
def test_sampler_settings_errors(kw, error, match):
  with pytest.raises(error, match=match):
    SM.SamplerSettings(**kw)


def test_sample_errors():
  noise = _noise(9)[:2]
  with pytest.raises(TypeError, match="settings must be a SamplerSettings, got dict"):
    SM.sample(gaussian_denoiser, None, noise, None, schedule=COSINE, settings={"sampler": "ddim"})
  with pytest.raises(ValueError, match="sampler 'ddim' \\(eta=0.5\\).*pass a PRNG key"):
    SM.sample(
        gaussian_denoiser,
        None,
        noise,
        None,
        schedule=COSINE,
        settings=SM.SamplerSettings(eta=0.5),
    )
