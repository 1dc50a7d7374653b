"""IF's discrete-time diffusion against diffusers' DDPMScheduler (goldens from
tests/goldens/make_if_goldens.py; no torch here)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import discrete, samplers, schedules

GOLDEN = os.path.join(os.path.dirname(__file__), "goldens", "deepfloyd", "scheduler.npz")


@pytest.fixture(scope="module")
def g():
  return dict(np.load(GOLDEN))


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def test_table_and_respacing(g):
  # torch.cumprod multiplies in another order than our sequential float32 loop: a few ulps.
  np.testing.assert_allclose(discrete.alphas_cumprod(), g["alphas_cumprod"], rtol=3e-6, atol=0)
  for n in (10, 27):
    np.testing.assert_array_equal(discrete.leading_timesteps(n), g[f"timesteps_{n}"])


@pytest.mark.parametrize("steps", [10, 27])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_ddpm_step_matches_diffusers(g, steps, k):
  tag = f"{steps}_{k}"
  ts = g[f"timesteps_{steps}"]
  t = int(g[f"t_{tag}"])
  prev_t = int(discrete.previous_timesteps(ts)[list(ts).index(t)])
  prev, x0 = jax.jit(discrete.ddpm_step)(
      _nhwc(g[f"model_output_{tag}"]),
      _nhwc(g[f"sample_{tag}"]),
      t,
      prev_t,
      _nhwc(g[f"noise_{tag}"]),
  )
  np.testing.assert_allclose(x0, _nhwc(g[f"x0_{tag}"]), atol=2e-5)
  np.testing.assert_allclose(prev, _nhwc(g[f"prev_{tag}"]), atol=2e-5)


def test_thresholding_and_variance_matter(g):
  """The goldens exercise both: other settings give other results (so the test above can fail)."""
  tag = "10_0"
  args = (_nhwc(g[f"model_output_{tag}"]), _nhwc(g[f"sample_{tag}"]), int(g[f"t_{tag}"]), 800)
  noise = _nhwc(g[f"noise_{tag}"])
  prev, x0 = discrete.ddpm_step(*args, noise)
  _, x0_clip = discrete.ddpm_step(*args, noise, thresholding=False)
  prev_small, _ = discrete.ddpm_step(*args, noise, variance_type="fixed_small")
  assert np.abs(x0 - x0_clip).max() > 1e-2
  assert np.abs(prev - prev_small).max() > 1e-2


def test_lowres_conditioning_matches_diffusers(g):
  up = discrete.upsample_bilinear_align_corners(_nhwc(g["lowres"]), (16, 16))
  np.testing.assert_allclose(up, _nhwc(g["upsampled"]), atol=1e-6)
  noised = discrete.augment_lowres(up, g["aug_level"], _nhwc(g["aug_noise"]))
  np.testing.assert_allclose(noised, _nhwc(g["lowres_noised"]), atol=1e-5)
  assert int(discrete.noise_level_of(0.25)) == 250 and int(discrete.noise_level_of(1.0)) == 999


def test_schedule_is_the_table_at_grid_points():
  s = schedules.get_schedule("squaredcos_cap_v2")
  a = discrete.alphas_cumprod()
  i = np.array([0, 1, 250, 999])
  np.testing.assert_allclose(s.logsnr_fn(i / 999.0), np.log(a[i] / (1 - a[i])), rtol=1e-5)
  t = np.linspace(0, 1, 37)
  np.testing.assert_allclose(s.t_fn(s.logsnr_fn(t)), t, atol=1e-5)
  assert np.all(np.diff(np.asarray(s.logsnr_fn(t))) < 0)


def test_previous_timesteps_refuses_bad_lists():
  np.testing.assert_array_equal(discrete.previous_timesteps([999, 500, 0]), [500, 0, -1])
  with pytest.raises(ValueError, match="strictly decreasing"):
    discrete.previous_timesteps([5, 5, 0])
  with pytest.raises(ValueError, match="num_inference_steps"):
    discrete.leading_timesteps(0)


def _oracle_model(x):
  """A model that knows the data point x: eps = (z - sqrt(abar) x) / sqrt(1 - abar)."""
  a = jnp.asarray(discrete.alphas_cumprod())

  def fn(z, t, cond):
    abar = a[t.astype(jnp.int32)][:, None, None, None]
    eps = (z - jnp.sqrt(abar) * x) / jnp.sqrt(1 - abar)
    return jnp.concatenate([eps, jnp.zeros_like(eps)], axis=-1)

  return fn


def test_ddpm_loop_recovers_the_data_with_an_oracle():
  x = jnp.asarray(np.random.default_rng(0).uniform(-0.9, 0.9, (2, 4, 4, 3)), jnp.float32)
  noise = jax.random.normal(jax.random.key(1), x.shape)
  out = discrete.sample(
      _oracle_model(x),
      {},
      noise,
      jax.random.key(2),
      timesteps=tuple(discrete.leading_timesteps(20)),
  )
  np.testing.assert_allclose(out, x, atol=1e-4)
  keys = jax.random.split(jax.random.key(3), 2)
  out2 = discrete.sample(
      _oracle_model(x), {}, noise, keys, timesteps=tuple(discrete.leading_timesteps(20))
  )
  np.testing.assert_allclose(out2, x, atol=1e-4)


def test_ddim_on_the_if_schedule_recovers_the_data_with_an_oracle():
  """Our continuous-time DDIM runs on IF's table through the Schedule (eps-only DenoiseFn)."""
  s = schedules.get_schedule("squaredcos_cap_v2")
  x = jnp.asarray(np.random.default_rng(0).uniform(-0.9, 0.9, (2, 4, 4, 3)), jnp.float32)

  def denoise(z, logsnr, cond):
    alpha, sigma = schedules.alpha_sigma(logsnr)
    return (z - alpha[:, None, None, None] * x) / sigma[:, None, None, None]

  noise = jax.random.normal(jax.random.key(1), x.shape)
  for name in ("ddim", "dpmpp_2m"):
    st = samplers.SamplerSettings(sampler=name, num_steps=12, threshold="none")
    out = samplers.sample(denoise, {}, noise, jax.random.key(0), schedule=s, settings=st)
    np.testing.assert_allclose(out, x, atol=1e-3, err_msg=name)
