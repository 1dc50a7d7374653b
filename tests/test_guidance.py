"""Classifier-free guidance and thresholding (imagen_jax/diffusion/guidance.py)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import guidance as G


def _np_dynamic_threshold(x0, p):
  """Plain NumPy reference of Imagen Fig. A.31, one sample at a time."""
  out = np.empty_like(x0)
  for b in range(x0.shape[0]):
    s = max(np.percentile(np.abs(x0[b]), p), 1.0)
    out[b] = np.clip(x0[b], -s, s) / s
  return out


def _outlier_batch(seed, shape=(6, 8, 8, 3)):
  rng = np.random.default_rng(seed)
  x = rng.normal(0.0, 1.5, shape).astype(np.float32)
  # Outliers of very different sizes per sample, and one sample entirely inside [-1, 1].
  x[0, 0, 0, 0] = 40.0
  x[1, 3, 2, :] = -25.0
  x[2] *= 0.3
  x[3] = np.clip(x[3], -0.99, 0.99)
  x[4] *= 4.0
  return x


@pytest.mark.parametrize("p", [99.5, 90.0, 50.0, 100.0, 0.995])
@pytest.mark.parametrize("seed", [0, 1])
def test_dynamic_threshold_matches_numpy(p, seed):
  x = _outlier_batch(seed)
  got = np.asarray(G.dynamic_threshold(jnp.asarray(x), p))
  # rtol 1e-4, not 1e-6: jnp.percentile forms the fractional rank q/100 * (n - 1) in float32
  # (abs error ~ n * 6e-8) and multiplies it by the gap between order statistics, which the
  # outliers make ~40; NumPy does the same in float64.
  np.testing.assert_allclose(got, _np_dynamic_threshold(x, p), rtol=1e-4, atol=1e-6)
  assert got.min() >= -1.0 and got.max() <= 1.0


def test_dynamic_threshold_actually_rescales():
  # Guards against a no-op implementation passing the NumPy comparison by accident: sample 4
  # (std 6) must be divided by its s > 1, so its values are not a clip of the input.
  x = _outlier_batch(0)
  got = np.asarray(G.dynamic_threshold(jnp.asarray(x), 99.5))
  s4 = np.percentile(np.abs(x[4]), 99.5)
  assert s4 > 5
  np.testing.assert_allclose(got[4], np.clip(x[4], -s4, s4) / s4, rtol=1e-5)
  assert not np.allclose(got[4], np.clip(x[4], -1, 1))


def test_dynamic_threshold_identity_inside_unit_box():
  x = jnp.asarray(np.random.default_rng(0).uniform(-1.0, 1.0, (4, 16, 16, 3)), jnp.float32)
  np.testing.assert_array_equal(G.dynamic_threshold(x, 99.5), x)
  edge = jnp.ones((2, 4, 4, 3)).at[1].set(-1.0)
  np.testing.assert_array_equal(G.dynamic_threshold(edge), edge)


def test_dynamic_threshold_output_range_random():
  for seed in range(5):
    x = jnp.asarray(10.0 * np.random.default_rng(seed).normal(size=(3, 8, 8, 3)), jnp.float32)
    out = G.dynamic_threshold(x, 99.5)
    assert float(jnp.max(jnp.abs(out))) <= 1.0


def test_dynamic_threshold_per_sample_independent():
  x = jnp.asarray(_outlier_batch(3))
  base = np.asarray(G.dynamic_threshold(x, 99.5))
  changed = x.at[2].multiply(50.0).at[2, 0, 0, 0].set(1e4)
  out = np.asarray(G.dynamic_threshold(changed, 99.5))
  keep = [0, 1, 3, 4, 5]
  np.testing.assert_array_equal(out[keep], base[keep])
  assert not np.allclose(out[2], base[2])


def test_dynamic_threshold_max_scale_cap():
  x = jnp.asarray(_outlier_batch(0))
  s = np.maximum(np.percentile(np.abs(np.asarray(x)).reshape(6, -1), 99.5, axis=1), 1.0)
  s = np.minimum(s, 2.0).reshape(6, 1, 1, 1)
  got = G.dynamic_threshold(x, 99.5, max_scale=2.0)
  np.testing.assert_allclose(got, np.clip(np.asarray(x), -s, s) / s, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="max_scale must be >= 1.*got 0.5"):
    G.dynamic_threshold(x, 99.5, max_scale=0.5)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, 100.5, 1000.0])
def test_dynamic_threshold_bad_percentile(bad):
  with pytest.raises(ValueError, match=rf"percentile must be in \(0, 100\].*got {bad}"):
    G.dynamic_threshold(jnp.ones((2, 4, 4, 3)), bad)


def test_dynamic_threshold_traced_percentile_is_a_type_error():
  with pytest.raises(TypeError, match="static Python number"):
    jax.jit(G.dynamic_threshold)(jnp.ones((2, 4, 4, 3)), 99.5)


def test_quantile_trap_is_legal_but_different():
  # 0.995 is in (0, 100] so it is accepted -- but it is the 0.995th percentile, which makes
  # dynamic thresholding collapse to static clipping for this batch (s = max(small, 1) = 1).
  x = jnp.asarray(_outlier_batch(0))
  trap = G.dynamic_threshold(x, 0.995)
  np.testing.assert_allclose(trap, G.static_threshold(x), atol=1e-7)
  assert not np.allclose(trap, G.dynamic_threshold(x, 99.5))


def test_dynamic_threshold_under_jit():
  x = jnp.asarray(_outlier_batch(1))
  f = jax.jit(G.dynamic_threshold, static_argnames=("percentile",))
  np.testing.assert_allclose(
      f(x, percentile=99.5), _np_dynamic_threshold(np.asarray(x), 99.5), rtol=1e-4, atol=1e-6
  )


def test_static_and_apply_threshold():
  x = jnp.asarray(_outlier_batch(2))
  np.testing.assert_array_equal(G.static_threshold(x), np.clip(np.asarray(x), -1, 1))
  np.testing.assert_array_equal(G.apply_threshold(x, "none"), x)
  np.testing.assert_array_equal(G.apply_threshold(x, "static"), G.static_threshold(x))
  np.testing.assert_array_equal(G.apply_threshold(x, "dynamic", 90.0), G.dynamic_threshold(x, 90.0))
  with pytest.raises(ValueError, match="unknown threshold mode 'clip'.*dynamic"):
    G.apply_threshold(x, "clip")


def test_classifier_free_guidance():
  rng = np.random.default_rng(0)
  c = jnp.asarray(rng.normal(size=(3, 4, 4, 3)), jnp.float32)
  u = jnp.asarray(rng.normal(size=(3, 4, 4, 3)), jnp.float32)
  np.testing.assert_array_equal(G.classifier_free_guidance(c, u, 1.0), c)
  np.testing.assert_array_equal(G.classifier_free_guidance(c, u, 0.0), u)
  np.testing.assert_allclose(G.classifier_free_guidance(c, u, 2.0), 2 * c - u, atol=1e-6)
  np.testing.assert_allclose(G.classifier_free_guidance(c, u, 7.5), u + 7.5 * (c - u), atol=1e-5)
  # One w per example: [B] is broadcast explicitly (rank promotion raises in tests).
  w = jnp.asarray([1.0, 0.0, 2.0])
  out = G.classifier_free_guidance(c, u, w)
  np.testing.assert_array_equal(out[0], c[0])
  np.testing.assert_array_equal(out[1], u[1])
  np.testing.assert_allclose(out[2], 2 * c[2] - u[2], atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_nonfinite_guidance_weight_refused(bad):
  c = jnp.ones((2, 4, 4, 3))
  with pytest.raises(ValueError, match=r"guidance_weight must be finite.*got"):
    G.classifier_free_guidance(c, c, bad)
  with pytest.raises(ValueError, match=r"guidance_weight must be finite"):
    G.check_guidance_weight(bad)
  with pytest.raises(ValueError, match=r"must be finite.*\[1\.0, (nan|inf|-inf)\]"):
    G.classifier_free_guidance(c, c, np.asarray([1.0, bad]))
  with pytest.raises(TypeError, match="guidance_weight must be a static Python number"):
    G.check_guidance_weight("7.5")
  assert G.check_guidance_weight(np.float32(1.35)) == pytest.approx(1.35)


def test_nonfinite_guidance_weight_traced_is_not_checked_inside_jit():
  # A traced w cannot be inspected; it is checked where it is set (check_guidance_weight).
  c = jnp.ones((2, 4, 4, 3))
  out = jax.jit(G.classifier_free_guidance)(c, 2 * c, jnp.float32(3.0))
  np.testing.assert_allclose(out, 3 * c - 2 * 2 * c)


def _zero_denoiser(z, logsnr, cond):
  del logsnr, cond
  return jnp.zeros_like(z)


def test_percentile_below_one_warns_once_at_settings_time():
  from imagen_jax.diffusion import samplers

  with pytest.warns(
      G.PercentileScaleWarning, match=r"0\.995th percentile.*did you mean 99\.5"
  ) as rec:
    settings = samplers.SamplerSettings(num_steps=2, percentile=0.995)
  assert len(rec) == 1 and rec[0].filename == __file__  # points at the line making the setting
  with pytest.warns(G.PercentileScaleWarning, match="0-100 scale"):
    assert G.check_percentile(0.5) == 0.5
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no further warning: not at every step, not for 99.5 / 1
    samplers.sample(
        _zero_denoiser,
        None,
        jnp.ones((1, 4, 4, 3)),
        None,
        schedule="cosine",
        settings=settings,
    )
    G.dynamic_threshold(jnp.ones((1, 4, 4, 3)), 0.995)
    samplers.SamplerSettings(percentile=99.5)
    G.check_percentile(1.0)


def test_percentile_below_one_is_silent_when_unused():
  from imagen_jax.diffusion import samplers

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    samplers.SamplerSettings(threshold="static", percentile=0.995)


# ----- per-step guidance schedules (guidance_weight_at, through Stage.sample) -----


def test_guidance_schedule_weights_closed_form():
  t = jnp.linspace(0.0, 1.0, 1001)
  np.testing.assert_array_equal(G.guidance_weight_at(3.0, t, "constant"), np.full(1001, 3.0))
  lin = np.asarray(G.guidance_weight_at(3.0, t, "linear"))
  np.testing.assert_allclose(lin, 1.0 + 4.0 * (1.0 - np.asarray(t)), rtol=1e-6)
  assert lin[-1] == pytest.approx(1.0) and lin[0] == pytest.approx(5.0)  # t=1 noise: no guidance
  assert np.trapezoid(lin, np.asarray(t)) == pytest.approx(3.0, rel=1e-6)  # mean w over t
  np.testing.assert_allclose(G.guidance_weight_at(1.0, t, "linear"), np.ones(1001))
  with pytest.raises(ValueError, match="unknown guidance_schedule 'cosine'.*linear"):
    G.guidance_weight_at(3.0, t, "cosine")


class _CondIsOne:
  """A stand-in network: eps = 1 for text rows, 0 for null-text rows, so that the guided eps
  w * 1 + (1 - w) * 0 is the w the denoiser applied."""

  def apply(self, variables, z_t, logsnr, text_emb, text_mask, **kw):
    del variables, logsnr, text_emb, kw
    return jnp.broadcast_to(text_mask.any(axis=-1).reshape(-1, 1, 1, 1), z_t.shape) * 1.0


@pytest.mark.parametrize("schedule,sampler", [("linear", "ddim"), ("linear", "heun")])
def test_guidance_schedule_denoiser_sees_w_of_t_at_each_step(schedule, sampler):
  from imagen_jax.diffusion import samplers
  from imagen_jax.diffusion.schedules import get_schedule
  from imagen_jax.stage import SamplingSettings, Stage

  stage = Stage(
      name="test",
      model=_CondIsOne(),
      schedule=get_schedule("cosine"),
      target="eps",
      is_sr=False,
      image_size=4,
      lowres_size=0,
      train_image_size=4,
      train_lowres_size=0,
      text_dim=2,
      text_len=3,
  )
  settings = SamplingSettings(
      sampler=sampler,
      num_steps=5,
      guidance_weight=3.0,
      guidance_schedule=schedule,
      time_grid="karras" if sampler == "heun" else "uniform_t",
      threshold="none",
  )
  cond = {"text_emb": jnp.ones((2, 3, 2)), "text_mask": jnp.ones((2, 3), bool)}
  noise = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 3)), jnp.float32)
  seen = []
  fn = stage.denoise_fn(None, 3.0, guidance_schedule=schedule)

  def recording(z_t, logsnr, c):
    eps = fn(z_t, logsnr, c)
    jax.debug.callback(lambda lam, e: seen.append((float(lam[0]), e.copy())), logsnr, eps)
    return eps

  ss = settings.sampler_settings()
  out = samplers.sample(recording, cond, noise, None, schedule=stage.schedule, settings=ss)
  jax.effects_barrier()
  # Stage.sample runs the same guided denoiser: the same images.
  np.testing.assert_array_equal(stage.sample(None, cond, noise, None, settings), out)
  t = np.asarray(samplers.time_grid(stage.schedule, ss))[:-1]
  lam = np.asarray(stage.schedule.logsnr_fn(jnp.asarray(t)))
  assert len(seen) == ss.network_calls
  for lam_call, eps in seen:
    i = int(np.argmin(np.abs(lam - lam_call)))  # the grid point of this call
    assert abs(lam[i] - lam_call) < 1e-4
    np.testing.assert_allclose(eps, 1.0 + 2.0 * 2.0 * (1.0 - t[i]), rtol=1e-5)
  # The schedule varies w: the first call (t near 1) sees w ~ 1, the last 2w - 1 minus a step.
  ws = sorted(float(e.mean()) for _, e in seen)
  assert ws[0] < 1.1 and ws[-1] > 4.0
