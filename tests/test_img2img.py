"""Image-to-image (SDEdit, imagen_jax/diffusion/editing.py) against exact answers.

For Gaussian data x0 ~ N(MU, S^2 I) the optimal denoiser is closed form and deterministic DDIM
is affine in its start, so a run from z_{t_start} = alpha_0 x + sigma_0 eps returns exactly

    out = MU + A (z_{t_start} - alpha_0 MU),

A the product of the per-step gains on the SDEdit grid (float64, :func:`_ddim_gain`). That pins
down the start, the time grid and the step count at once.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import editing
from imagen_jax.diffusion import samplers as SM
from imagen_jax.diffusion.schedules import alpha_sigma, get_schedule

MU, S = 0.2, 0.25
SHAPE = (16, 8, 8, 3)
COSINE = get_schedule("cosine")


def gaussian_denoiser(z_t, logsnr, cond):
  """The Bayes-optimal eps_hat for x0 ~ N(MU, S^2) elementwise."""
  del cond
  alpha, sigma = alpha_sigma(logsnr.reshape(-1, 1, 1, 1))
  return sigma * (z_t - alpha * MU) / (alpha * alpha * S * S + sigma * sigma)


def _ddim_gain(ts):
  """float64 gain A of deterministic DDIM on the grid ``ts`` (cosine closed form)."""
  b = math.atan(math.exp(-10.0))
  lam = np.clip(-2.0 * np.log(np.tan(b + (math.atan(math.exp(10.0)) - b) * ts)), -20.0, 20.0)
  al, si = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
  k = al * S * S / (al * al * S * S + si * si)  # x0_hat - MU = k_t (z_t - alpha_t MU)
  gain = 1.0
  for t in range(len(ts) - 2):
    gain *= al[t + 1] * k[t] + si[t + 1] * (1.0 - al[t] * k[t]) / si[t]
  return gain * k[len(ts) - 2]


def _run(strength, x, noise, num_steps=20, callback=None, **kw):
  settings = SM.SamplerSettings(num_steps=num_steps, threshold="none", **kw)
  return SM.sample(
      gaussian_denoiser,
      None,
      noise,
      None,
      schedule=COSINE,
      settings=settings,
      init_image=x,
      edit=editing.EditSettings(strength=strength),
      callback=callback,
  )


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(-1, 1, SHAPE), jnp.float32)
  return x, jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)


def test_img2img_time_grid_starts_at_t_start():
  base = SM.SamplerSettings(num_steps=20)
  s = editing.sdedit_settings(base, 0.3)
  assert (s.t_max, s.num_steps, s.t_min) == (0.3, 6, 0.0)  # ceil(0.3 * 20) steps
  assert editing.sdedit_settings(base, 1.0) is base
  assert editing.sdedit_settings(base, 0.01).num_steps == 1
  for grid in ("uniform_t", "logsnr_uniform"):
    ts = np.asarray(SM.time_grid(COSINE, dataclasses.replace(s, time_grid=grid)))
    assert ts[0] == np.float32(0.3) and ts[-1] == 0.0 and len(ts) == 7
  # Through the sampler: the network is called at the grid's times, the first at t_start.
  x, noise = _inputs()
  seen = []
  _run(0.3, x, noise, callback=seen.append)
  jax.effects_barrier()
  seen.sort(key=lambda d: int(d["i"]))
  np.testing.assert_allclose([float(d["t"]) for d in seen], SM.time_grid(COSINE, s)[:-1])
  # The start is z = alpha(t_start) x + sigma(t_start) eps.
  alpha, sigma = alpha_sigma(COSINE.logsnr_fn(jnp.float32(0.3)))
  np.testing.assert_allclose(seen[0]["x"], alpha * x + sigma * noise, atol=1e-6)


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.1])
def test_img2img_output_is_the_exact_affine_map_of_the_noised_input(strength):
  x, noise = _inputs(1)
  out = np.asarray(_run(strength, x, noise), np.float64)
  ts = np.linspace(strength, 0.0, math.ceil(round(strength * 20, 9)) + 1)
  alpha, sigma = (float(v) for v in alpha_sigma(COSINE.logsnr_fn(jnp.float32(strength))))
  start = alpha * np.asarray(x, np.float64) + sigma * np.asarray(noise, np.float64)
  want = MU + _ddim_gain(ts) * (start - alpha * MU)
  # float32: at strength 1 the first x0_hat divides by alpha = 4.5e-5 (~1e-3 rounding, damped
  # by the next step's alpha_s; test_samplers.py), later steps add ~1e-6 each.
  np.testing.assert_allclose(out, want, atol=5e-4 if strength == 1.0 else 1e-5)


def test_img2img_strength_one_equals_plain_sampling_and_small_strength_stays_close():
  x, noise = _inputs(2)
  plain = SM.sample(
      gaussian_denoiser,
      None,
      noise,
      None,
      schedule=COSINE,
      settings=SM.SamplerSettings(num_steps=20, threshold="none"),
  )
  # The starts differ by alpha(t_max) x = 4.5e-5 x, which the sampler shrinks (gain ~S).
  np.testing.assert_allclose(_run(1.0, x, noise), plain, atol=5e-4)
  far = float(jnp.mean(jnp.abs(plain - x)))
  near = float(jnp.mean(jnp.abs(_run(0.05, x, noise) - x)))
  assert far > 0.4 and near < 0.2 * far, (near, far)


@pytest.mark.parametrize(
    "strength,error,match",
    [
        (0.0, ValueError, r"strength must be in \(0, 1\].*got 0.0"),
        (1.5, ValueError, r"strength must be in \(0, 1\].*got 1.5"),
        (float("nan"), ValueError, r"strength must be in \(0, 1\].*got nan"),
        (True, TypeError, "strength must be a static Python number"),
        (jnp.float32(0.5), TypeError, "strength must be a static Python number"),
    ],
)
def test_img2img_bad_strength_fails_clearly(strength, error, match):
  with pytest.raises(error, match=match):
    editing.EditSettings(strength=strength)


def test_img2img_bad_inputs_fail_clearly():
  x, noise = _inputs(3)
  with pytest.raises(ValueError, match=r"strength=0.2 starts at t = 0.2, not above .*t_min=0.5"):
    editing.sdedit_settings(SM.SamplerSettings(t_min=0.5), 0.2)
  with pytest.raises(ValueError, match="needs init_image"):
    _run(0.5, None, noise)
  with pytest.raises(ValueError, match=r"init_image has shape \(16, 4, 4, 3\); allowed"):
    _run(0.5, x[:, :4, :4], noise)
  with pytest.raises(ValueError, match=r"init_image values must be in \[-1, 1\].*max 255"):
    _run(0.5, x * 0 + 255.0, noise)
