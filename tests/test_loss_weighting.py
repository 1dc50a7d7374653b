"""Loss weighting over time: Min-SNR-gamma (Hang et al. 2023) against its closed form, and the
weights reaching the train step the trainer uses (`train.loss_weighting`)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import forward as F
from imagen_jax.diffusion import losses as L
from imagen_jax.diffusion import parameterization as P
from imagen_jax.train import settings as settings_lib
from tests import test_train_step as ts

LOGSNR = np.linspace(-20.0, 20.0, 81)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 5.0, 20.0])
def test_min_snr_weight_matches_closed_form(gamma):
  snr = np.exp(LOGSNR)  # float64 reference
  want = {
      "x0": np.minimum(snr, gamma),
      "eps": np.minimum(snr, gamma) / snr,
      "v": np.minimum(snr, gamma) / (snr + 1.0),
  }
  for space, w in want.items():
    got = np.asarray(L.min_snr_weight(jnp.asarray(LOGSNR, jnp.float32), gamma, space=space))
    assert got.dtype == np.float32 and got.shape == LOGSNR.shape
    np.testing.assert_allclose(got, w, rtol=2e-6, atol=0)
  # eps: 1 up to SNR = gamma (noisy steps keep the plain loss), gamma / SNR above.
  w_eps = np.asarray(L.min_snr_weight(jnp.asarray(LOGSNR, jnp.float32), gamma))
  np.testing.assert_array_equal(w_eps[LOGSNR <= np.log(gamma) - 1e-3], 1.0)
  assert np.all(w_eps[LOGSNR > np.log(gamma) + 1e-3] < 1.0)


@pytest.mark.parametrize("target,space", list(itertools.product(P.TARGETS, P.TARGETS)))
def test_min_snr_is_one_objective_in_every_space(target, space):
  # The weighted loss of one prediction is the same number whichever space it is measured in:
  # w_space |error in space|^2 = min(SNR, gamma) |x0 error|^2 (Hang et al. 2023, Eq. 6-8).
  rng = np.random.default_rng(0)
  shape = (5, 4, 4, 3)
  x0 = jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
  noise = jnp.asarray(rng.normal(size=shape), jnp.float32)
  logsnr = jnp.asarray([-5.0, -1.0, 0.5, 1.6, 4.0], jnp.float32)
  z = F.q_sample(x0, logsnr, noise)
  exact = L.regression_target(x0=x0, noise=noise, logsnr=logsnr, target=target)
  pred = exact + 0.1 * jnp.asarray(rng.normal(size=shape), jnp.float32)
  kw = dict(x0=x0, noise=noise, z_t=z, logsnr=logsnr, target=target)
  gamma = 2.0
  ref = L.diffusion_loss(pred, space="x0", **kw) * np.minimum(np.exp(logsnr), gamma)
  w = L.loss_weights(logsnr, weighting="min_snr", gamma=gamma, space=space)
  np.testing.assert_allclose(L.diffusion_loss(pred, space=space, weights=w, **kw), ref, rtol=1e-4)
  assert L.loss_weights(logsnr, weighting="none", space=space) is None  # the paper's plain loss


@pytest.mark.parametrize("gamma", [0.0, -1.0, float("nan")])
def test_min_snr_bad_gamma_is_a_clear_error(gamma):
  with pytest.raises(ValueError, match=r"min_snr_gamma must be > 0.*got"):
    L.min_snr_weight(jnp.zeros(2), gamma)
  with pytest.raises(ValueError, match="unknown loss weighting 'snr'.*'none', 'min_snr'"):
    L.loss_weights(jnp.zeros(2), weighting="snr")
  with pytest.raises(ValueError, match="unknown loss space 'score'"):
    L.min_snr_weight(jnp.zeros(2), space="score")
  config = ts.load_config("base64")
  config.train.min_snr_gamma = gamma
  config.train.loss_weighting = "min_snr"
  with pytest.raises(ValueError, match=r"train.min_snr_gamma=.* must be > 0"):
    settings_lib.StepSettings.from_config(config)
  config.train.min_snr_gamma = 5.0
  config.train.loss_weighting = "minsnr"
  with pytest.raises(ValueError, match="train.loss_weighting='minsnr' is not one of"):
    settings_lib.StepSettings.from_config(config)


def test_min_snr_weights_reach_the_train_step():
  # The trainer's step (train.step.make_train_step) with the same draws: a gamma above every
  # SNR of the schedule (logsnr <= 20) is the plain loss; gamma = 5 down-weights the low-noise
  # examples (eps weights <= 1, < 1 where SNR > 5), so the loss drops; a smaller gamma more.
  losses = {}
  for weighting, gamma in [("none", 5.0), ("min_snr", 1e12), ("min_snr", 5.0), ("min_snr", 0.1)]:
    _, fn, _, state, _, _ = ts.setup(
        "base64", **{"train.loss_weighting": weighting, "train.min_snr_gamma": gamma}
    )
    batch = jax.tree.map(jnp.asarray, ts.make_batch("base64"))
    _, m = fn(state, batch, jax.random.key(1), ts.toy_text_params())
    losses[weighting, gamma] = float(m["loss"])
  plain = losses["none", 5.0]
  assert losses["min_snr", 1e12] == pytest.approx(plain, rel=1e-6)
  assert plain > losses["min_snr", 5.0] > losses["min_snr", 0.1] > 0.0
