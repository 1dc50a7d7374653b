"""Forward process, eps/x0/v conversions and the per-example loss (imagen_jax/diffusion)."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import forward as F
from imagen_jax.diffusion import losses as L
from imagen_jax.diffusion import parameterization as P
from imagen_jax.diffusion.schedules import alpha_sigma

B, H, W, C = 4, 8, 8, 3


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  x0 = jnp.asarray(rng.uniform(-1.0, 1.0, (B, H, W, C)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=(B, H, W, C)), jnp.float32)
  logsnr = jnp.asarray([-6.0, -1.0, 2.0, 7.0], jnp.float32)
  return x0, noise, logsnr


def test_q_sample_moments():
  # z = alpha x0 + sigma eps: over many draws mean -> alpha x0, var -> sigma^2, per example.
  n = 20000
  x0 = jnp.broadcast_to(jnp.asarray([0.7, -0.3, 0.1, 0.9]).reshape(4, 1, 1, 1), (4, 1, 1, n))
  logsnr = jnp.asarray([-3.0, 0.0, 1.5, 4.0])
  noise = jnp.asarray(np.random.default_rng(1).normal(size=x0.shape), jnp.float32)
  z = np.asarray(F.q_sample(x0, logsnr, noise)).reshape(4, n)
  alpha, sigma = (np.asarray(a) for a in alpha_sigma(logsnr))
  mean, var = z.mean(1), z.var(1)
  # 5 standard errors: SE(mean) = sigma / sqrt(n), SE(var) = sigma^2 sqrt(2 / n).
  np.testing.assert_array_less(np.abs(mean - alpha * x0[:, 0, 0, 0]), 5 * sigma / np.sqrt(n))
  np.testing.assert_array_less(np.abs(var - sigma**2), 5 * sigma**2 * np.sqrt(2 / n))


def test_q_sample_scalar_logsnr_and_bad_shape():
  x0, noise, _ = _batch()
  z = F.q_sample(x0, jnp.float32(0.0), noise)
  np.testing.assert_allclose(z, np.sqrt(0.5) * (x0 + noise), atol=1e-6)
  with pytest.raises(ValueError, match=r"shape \[4\].*got shape \(3,\)"):
    F.q_sample(x0, jnp.zeros(3), noise)


def test_noise_condition_augment():
  x0, noise, _ = _batch()
  aug = jnp.asarray([0.0, 0.25, 0.5, 1.0])
  out = np.asarray(F.noise_condition_augment(x0, aug, noise))
  np.testing.assert_array_equal(out[0], np.asarray(x0)[0])  # 0 = identity, exactly
  np.testing.assert_allclose(out[3], np.asarray(noise)[3], atol=1e-6)  # 1 = pure noise
  a, s = np.cos(np.pi / 8), np.sin(np.pi / 8)
  np.testing.assert_allclose(out[1], a * np.asarray(x0)[1] + s * np.asarray(noise)[1], atol=1e-6)
  np.testing.assert_allclose(a**2 + s**2, 1.0)  # variance preserving


def test_upsample_lowres_shape_range():
  low = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
  up = F.upsample_lowres(low, (16, 16))
  assert up.shape == (2, 16, 16, 3)
  assert float(jnp.max(jnp.abs(up))) <= 1.0
  const = jnp.full((1, 4, 4, 3), 0.25)
  np.testing.assert_allclose(F.upsample_lowres(const, (8, 8)), 0.25, atol=1e-6)
  with pytest.raises(ValueError, match="got shape"):
    F.upsample_lowres(low[0], (16, 16))


@pytest.mark.parametrize("target", P.TARGETS)
def test_conversions_round_trip(target):
  x0, noise, logsnr = _batch()
  z = F.q_sample(x0, logsnr, noise)
  truth = {"eps": noise, "x0": x0, "v": P.v_from(x0, noise, logsnr)}
  pred = truth[target]
  # |logsnr| <= 7 here: the divisions by alpha or sigma amplify float32 error by <= e^3.5 ~ 33.
  np.testing.assert_allclose(P.prediction_to_eps(pred, z, logsnr, target), noise, atol=2e-4)
  np.testing.assert_allclose(P.prediction_to_x0(pred, z, logsnr, target), x0, atol=2e-4)
  np.testing.assert_allclose(P.prediction_to_v(pred, z, logsnr, target), truth["v"], atol=2e-4)
  for other in P.TARGETS:
    there = P.convert_prediction(pred, z, logsnr, target, other)
    back = P.convert_prediction(there, z, logsnr, other, target)
    np.testing.assert_allclose(back, pred, atol=5e-4)


def test_v_identities():
  x0, noise, logsnr = _batch()
  v = P.v_from(x0, noise, logsnr)
  alpha, sigma = alpha_sigma(logsnr.reshape(B, 1, 1, 1))
  # |v|^2 + |z|^2 = |x0|^2 + |eps|^2 elementwise (v, z is a rotation of x0, eps).
  z = alpha * x0 + sigma * noise
  np.testing.assert_allclose(v**2 + z**2, x0**2 + noise**2, atol=1e-5)


def test_unknown_target():
  x0, noise, logsnr = _batch()
  with pytest.raises(ValueError, match="unknown prediction target 'score'"):
    P.prediction_to_x0(x0, x0, logsnr, "score")


@pytest.mark.parametrize("target", P.TARGETS)
def test_loss_zero_for_exact_prediction_and_weighting(target):
  x0, noise, logsnr = _batch()
  z = F.q_sample(x0, logsnr, noise)
  exact = L.regression_target(x0=x0, noise=noise, logsnr=logsnr, target=target)
  kw = dict(x0=x0, noise=noise, z_t=z, logsnr=logsnr, target=target)
  loss = L.diffusion_loss(exact, **kw)
  assert loss.shape == (B,) and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, 0.0, atol=1e-12)
  # Per-example error: offset sample b by d_b everywhere -> loss_b = d_b^2, times weights_b.
  d = jnp.asarray([0.0, 0.5, 1.0, 2.0])
  pred = exact + d.reshape(B, 1, 1, 1)
  np.testing.assert_allclose(L.diffusion_loss(pred, **kw), d**2, rtol=1e-5, atol=1e-6)
  w = jnp.asarray([3.0, 2.0, 0.0, 0.25])
  np.testing.assert_allclose(L.diffusion_loss(pred, weights=w, **kw), w * d**2, rtol=1e-5)
  # bf16 predictions are upcast: the loss stays float32.
  assert L.diffusion_loss(pred.astype(jnp.bfloat16), **kw).dtype == jnp.float32


@pytest.mark.parametrize("target,space", list(itertools.permutations(P.TARGETS, 2)))
def test_loss_in_another_space(target, space):
  x0, noise, logsnr = _batch()
  z = F.q_sample(x0, logsnr, noise)
  exact = L.regression_target(x0=x0, noise=noise, logsnr=logsnr, target=target)
  kw = dict(x0=x0, noise=noise, z_t=z, logsnr=logsnr, target=target, space=space)
  np.testing.assert_allclose(L.diffusion_loss(exact, **kw), 0.0, atol=1e-6)
  # An error d in `target` space is an error d * k(logsnr) in `space`, so the loss is the
  # familiar SNR weighting d^2 k^2: e.g. x0 -> eps divides by sigma and multiplies by alpha.
  snr = np.exp(np.asarray(logsnr, np.float64))
  k2 = {
      ("eps", "x0"): 1 / snr,
      ("x0", "eps"): snr,
      ("v", "eps"): snr / (1 + snr),
      ("v", "x0"): 1 / (1 + snr),
      ("eps", "v"): 1 + 1 / snr,
      ("x0", "v"): 1 + snr,
  }
  d = 0.1
  np.testing.assert_allclose(L.diffusion_loss(exact + d, **kw), d**2 * k2[target, space], rtol=2e-3)


def test_loss_bad_weights():
  x0, noise, logsnr = _batch()
  with pytest.raises(ValueError, match=r"weights must have shape \(4,\).*got \(4, 1\)"):
    L.diffusion_loss(
        noise, x0=x0, noise=noise, z_t=x0, logsnr=logsnr, target="eps", weights=jnp.ones((4, 1))
    )
