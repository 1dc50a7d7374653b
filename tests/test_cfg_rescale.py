"""CFG rescale (Lin et al. 2023 §3.4; imagen_jax/diffusion/guidance.py `rescale_guidance`)
against an independent NumPy computation and its closed-form properties."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import denoiser
from imagen_jax.diffusion import guidance as G
from imagen_jax.stage import SamplingSettings

SHAPE = (4, 8, 8, 3)


def _inputs(seed=0, logsnr=(-4.0, -0.5, 1.0, 5.0)):
  rng = np.random.default_rng(seed)
  eps_c, eps_u, z = (rng.normal(size=SHAPE).astype(np.float32) for _ in range(3))
  eps_c = eps_c + 0.3  # a conditional/unconditional gap for guidance to amplify
  return eps_c, eps_u, z, np.asarray(logsnr, np.float32)


def _np_rescale(eps_c, eps_u, z, logsnr, w, phi):
  """Lin et al. Eq. 14-18 on x0 = (z - sigma eps) / alpha, float64, one sample at a time."""
  out = np.empty(eps_c.shape, np.float64)
  for b in range(eps_c.shape[0]):
    a = math.sqrt(1 / (1 + math.exp(-float(logsnr[b]))))
    s = math.sqrt(1 / (1 + math.exp(float(logsnr[b]))))
    x_pos = (z[b].astype(np.float64) - s * eps_c[b]) / a
    x_neg = (z[b].astype(np.float64) - s * eps_u[b]) / a
    x_cfg = x_neg + w * (x_pos - x_neg)
    x_rescaled = x_cfg * x_pos.std() / x_cfg.std()
    x_final = phi * x_rescaled + (1 - phi) * x_cfg
    out[b] = (z[b] - a * x_final) / s
  return out


@pytest.mark.parametrize("phi", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("w", [3.0, 7.5])
def test_rescale_matches_numpy(phi, w):
  eps_c, eps_u, z, logsnr = _inputs()
  cfg = G.classifier_free_guidance(eps_c, eps_u, w)
  got = np.asarray(G.rescale_guidance(cfg, eps_c, z, logsnr, phi))
  want = _np_rescale(eps_c, eps_u, z, logsnr, w, phi)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert not np.allclose(got, cfg, atol=1e-2)  # it does change the guided prediction


def test_rescale_phi0_is_plain_cfg_and_phi1_has_the_conditional_std():
  eps_c, eps_u, z, logsnr = _inputs(1, logsnr=(-20.0, -3.0, 4.0, 20.0))  # the schedule's ends
  cfg = G.classifier_free_guidance(eps_c, eps_u, 5.0)
  np.testing.assert_array_equal(G.rescale_guidance(cfg, eps_c, z, logsnr, 0.0), cfg)
  out = G.rescale_guidance(cfg, eps_c, z, logsnr, 1.0)
  assert np.all(np.isfinite(np.asarray(out)))
  # phi = 1: x0_final has exactly std(x0_cond), per sample (x0 = (z - sigma eps) / alpha).
  a = jnp.sqrt(1 / (1 + jnp.exp(-logsnr))).reshape(-1, 1, 1, 1)
  s = jnp.sqrt(1 / (1 + jnp.exp(logsnr))).reshape(-1, 1, 1, 1)
  std = lambda e: np.asarray(jnp.std((z - s * e) / a, axis=(1, 2, 3)))  # noqa: E731
  np.testing.assert_allclose(std(out), std(eps_c), rtol=1e-4)
  # ... which plain w = 5 guidance inflates at high noise (at logsnr 20, x0 ~ z whatever eps).
  assert np.all(std(cfg)[:2] > 1.5 * std(eps_c)[:2])


def test_rescale_through_the_guided_denoise_fn():
  class Net:  # eps = +-1 per text row; null text (all-False mask) gives the unconditional eps

    def apply(self, variables, z_t, logsnr, text_emb, text_mask, **kw):
      del variables, logsnr, text_emb, kw
      cond = text_mask.any(axis=-1).reshape(-1, 1, 1, 1)
      return jnp.where(cond, 0.5 * z_t + 0.2, -0.3 * z_t)

  eps_c, eps_u, z, logsnr = _inputs(2)
  cond = {"text_emb": jnp.ones((4, 3, 2)), "text_mask": jnp.ones((4, 3), bool)}
  fn = denoiser.make_denoise_fn(
      Net(), None, target="eps", guidance_weight=4.0, guidance_rescale=0.7
  )
  e_c, e_u = 0.5 * z + 0.2, -0.3 * z
  want = _np_rescale(e_c, e_u, z, logsnr, 4.0, 0.7)
  np.testing.assert_allclose(
      fn(jnp.asarray(z), jnp.asarray(logsnr), cond), want, rtol=1e-4, atol=1e-4
  )


@pytest.mark.parametrize("phi", [-0.1, 1.5, float("nan"), float("inf")])
def test_rescale_phi_outside_unit_interval_refused(phi):
  with pytest.raises(ValueError, match=r"guidance_rescale must be in \[0, 1\].*got"):
    G.check_guidance_rescale(phi)
  with pytest.raises(ValueError, match=r"guidance_rescale must be in \[0, 1\]"):
    SamplingSettings(guidance_rescale=phi)
  eps_c, eps_u, z, logsnr = _inputs()
  with pytest.raises(ValueError, match="guidance_rescale"):
    G.rescale_guidance(eps_c, eps_c, z, logsnr, phi)


def test_rescale_phi_must_be_a_static_number():
  with pytest.raises(TypeError, match="guidance_rescale must be a static Python number"):
    G.check_guidance_rescale(jnp.float32(0.5))
  with pytest.raises(TypeError, match="guidance_rescale"):
    SamplingSettings(guidance_rescale="0.7")
