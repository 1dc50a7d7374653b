"""Inpainting (RePaint replacement + resampling, imagen_jax/diffusion/editing.py) against exact
answers, through the sampler, the cascade and the sample CLI.

Gaussian data with correlated pixels, x ~ N(MU, SIGMA) over a 2 x 4 image, has the closed-form
optimal eps predictor E[eps | z_t] = sigma (alpha^2 SIGMA + sigma^2 I)^-1 (z_t - alpha MU), and
the unknown pixels given the known ones the closed-form conditional

    x_u | x_k ~ N(MU_u + SIGMA_uk SIGMA_kk^-1 (x_k - MU_k),  SIGMA_uu - SIGMA_uk SIGMA_kk^-1 SIGMA_ku).

Every step of an inpainting run (DDPM step, replacement, re-noising) is affine in Gaussian
inputs, so the exact law of the output follows from a float64 recursion on its mean vector and
covariance matrix (:func:`_exact_law`). The test checks (1) that the float32 samples follow that
law to within 4 standard errors, and (2) how far that law is from the closed-form conditional:
replacement alone is off by ~0.55 conditional std in the mean, RePaint's resampling brings it
within the stated budget.
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from imagen_jax import images
from imagen_jax.diffusion import editing
from imagen_jax.diffusion import samplers as SM
from imagen_jax.diffusion.schedules import alpha_sigma
from imagen_jax.sampling import cascade, stage_sampler
from tests import cascade_fixtures

S, RHO, MU = 0.25, 0.6, 0.1
ROW, COL = np.divmod(np.arange(8), 4)  # pixel p of the [2, 4] image is (ROW[p], COL[p])
SIGMA = S * S * RHO ** (np.abs(ROW[:, None] - ROW[None]) + np.abs(COL[:, None] - COL[None]))
KNOWN = COL < 2  # the left two columns are known
X_KNOWN = np.array([0.3, -0.2, 0.4, 0.5])  # the known pixels, in pixel order
_EIG, _VEC = np.linalg.eigh(SIGMA)


def correlated_denoiser(z_t, logsnr, cond):
  """The Bayes-optimal eps_hat for x ~ N(MU, SIGMA) on [B, 2, 4, 1] images."""
  del cond
  alpha, sigma = alpha_sigma(logsnr[0])  # the sampler's logsnr is shared by the batch
  vec = jnp.asarray(_VEC, jnp.float32)
  inv = (vec / (alpha * alpha * jnp.asarray(_EIG, jnp.float32) + sigma * sigma)[None]) @ vec.T
  eps = sigma * (z_t.reshape(-1, 8) - alpha * MU) @ inv
  return eps.reshape(z_t.shape)


def _cosine_logsnr64(t):
  b = math.atan(math.exp(-10.0))
  return np.clip(-2.0 * np.log(np.tan(b + (math.atan(math.exp(10.0)) - b) * t)), -20.0, 20.0)


def _exact_law(num_steps, resample_steps):
  """float64 mean [4] and covariance [4, 4] of the unknown pixels after an inpainting run of
  DDPM (gamma = 0) on the uniform-t cosine grid, from the init z = alpha_0 x + sigma_0 eps
  (x's unknown pixels 0), written from the step equations of samplers.ddpm_step and
  editing.replace_known / editing.renoise."""
  lam = _cosine_logsnr64(np.linspace(1.0, 0.0, num_steps + 1))
  al, si = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
  eye, mu = np.eye(8), np.full(8, MU)
  x = np.zeros(8)
  x[KNOWN] = X_KNOWN
  m, c = al[0] * x, si[0] ** 2 * eye
  for i, back in zip(*editing.resample_plan(num_steps, resample_steps)):
    gain = al[i] * SIGMA @ np.linalg.inv(al[i] ** 2 * SIGMA + si[i] ** 2 * eye)  # x0_hat - MU
    a_x0, b_x0 = gain, mu - al[i] * gain @ mu  # x0_hat = a_x0 z + b_x0
    if i == num_steps - 1:  # the last step returns x0_hat, then the known pixels are x
      m, c = a_x0 @ m + b_x0, a_x0 @ c @ a_x0.T
      return m[~KNOWN], c[np.ix_(~KNOWN, ~KNOWN)]
    s = i + 1
    cc = -math.expm1(lam[i] - lam[s])
    a_eps, b_eps = (eye - al[i] * a_x0) / si[i], -al[i] * b_x0 / si[i]
    a = al[s] * a_x0 + si[s] * math.sqrt(1 - cc) * a_eps
    m = a @ m + al[s] * b_x0 + si[s] * math.sqrt(1 - cc) * b_eps
    c = a @ c @ a.T + si[s] ** 2 * cc * eye
    # Replacement: the known pixels become a fresh alpha_s x + sigma_s n.
    m[KNOWN] = al[s] * X_KNOWN
    c[KNOWN, :], c[:, KNOWN] = 0.0, 0.0
    c[np.ix_(KNOWN, KNOWN)] = si[s] ** 2 * np.eye(KNOWN.sum())
    if back:  # RePaint: z_t ~ q(z_t | z_s)
      k = al[i] / al[s]
      m, c = k * m, k * k * c + si[i] ** 2 * cc * eye
  raise AssertionError("unreachable")


def _closed_form():
  kk, uk, uu = (np.ix_(a, b) for a, b in [(KNOWN, KNOWN), (~KNOWN, KNOWN), (~KNOWN, ~KNOWN)])
  w = SIGMA[uk] @ np.linalg.inv(SIGMA[kk])
  return MU + w @ (X_KNOWN - MU), SIGMA[uu] - w @ SIGMA[uk].T


def _image(values_known, fill=0.0):
  x = np.full(8, fill)
  x[KNOWN] = values_known
  return x.reshape(2, 4, 1)


def test_inpaint_gaussian_conditional_moments_match_the_closed_form():
  n_steps, r, batch = 100, 10, 4096
  cond_mean, cond_cov = _closed_form()
  sd = np.sqrt(np.diag(cond_cov))
  mean_r, cov_r = _exact_law(n_steps, r)
  mean_1, _ = _exact_law(n_steps, 1)
  # The method's own error (exact law vs closed form), not the implementation's: replacement
  # alone leaves the conditional mean 0.55 sd off (the noised known pixels say little about x_k
  # at high noise); 10 resamplings of each of 100 steps bring it to 0.18 sd, at the cost of a
  # 12% lower spread (each resampling loop contracts towards the step's mean; more steps and
  # resamplings shrink both: 200 x 20 gives 0.09 sd and 10%, at 4x the test's time).
  assert np.max(np.abs(mean_1 - cond_mean) / sd) > 0.5
  assert np.max(np.abs(mean_r - cond_mean) / sd) < 0.2
  np.testing.assert_allclose(np.sqrt(np.diag(cov_r)) / sd, 1.0, atol=0.15)

  noise = jax.random.normal(jax.random.key(0), (batch, 2, 4, 1))
  x = jnp.broadcast_to(jnp.asarray(_image(X_KNOWN), jnp.float32), noise.shape)
  mask = jnp.broadcast_to(jnp.asarray(_image(1.0), jnp.float32), noise.shape)
  settings = SM.SamplerSettings(sampler="ddpm", num_steps=n_steps, threshold="none")
  out = SM.sample(
      correlated_denoiser,
      None,
      noise,
      jax.random.key(1),
      schedule="cosine",
      settings=settings,
      init_image=x,
      mask=mask,
      edit=editing.EditSettings(resample_steps=r),
  )
  out = np.asarray(out, np.float64).reshape(batch, 8)
  known = np.float32(X_KNOWN).astype(np.float64)
  np.testing.assert_array_equal(out[:, KNOWN], np.broadcast_to(known, (batch, 4)))
  u = out[:, ~KNOWN]
  # Samples vs the exact law: 4 standard errors (SE(mean) = sd / sqrt(n), SE(sd) = sd /
  # sqrt(2n), SE(corr) <= 1 / sqrt(n)), plus 1e-3 for the float32 first step at logsnr -20.
  sd_r = np.sqrt(np.diag(cov_r))
  np.testing.assert_allclose(u.mean(0), mean_r, atol=4 * sd_r.max() / math.sqrt(batch) + 1e-3)
  np.testing.assert_allclose(u.std(0), sd_r, atol=4 * sd_r.max() / math.sqrt(2 * batch) + 1e-3)
  corr = cov_r / np.outer(sd_r, sd_r)
  np.testing.assert_allclose(np.corrcoef(u.T), corr, atol=4 / math.sqrt(batch))
  # And so against the closed form: the budgets above plus 4 standard errors.
  assert np.max(np.abs(u.mean(0) - cond_mean) / sd) < 0.2 + 4 / math.sqrt(batch)
  np.testing.assert_allclose(u.std(0) / sd, 1.0, atol=0.15 + 4 / math.sqrt(2 * batch))


def test_inpaint_all_known_mask_returns_the_input_and_renoises_every_step():
  batch = 256
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (batch, 2, 4, 1)), jnp.float32)
  noise = jax.random.normal(jax.random.key(2), x.shape)
  settings = SM.SamplerSettings(sampler="ddim", num_steps=6, threshold="dynamic")
  seen = []
  out = SM.sample(
      correlated_denoiser,
      None,
      noise,
      jax.random.key(3),
      schedule="cosine",
      settings=settings,
      init_image=x,
      mask=jnp.ones((batch, 2, 4, 1)),
      callback=seen.append,
  )
  jax.effects_barrier()
  np.testing.assert_array_equal(out, x)
  seen.sort(key=lambda d: int(d["i"]))
  # Every step's input is a fresh q(z_t | x): (z_t - alpha_t x) / sigma_t ~ N(0, I), independent
  # of the previous step's (4 standard errors over 2048 pixels; step 0 is the init noise).
  prev = None
  for d in seen:
    alpha, sigma = alpha_sigma(jnp.float32(d["logsnr"]))
    n = ((d["x"] - alpha * np.asarray(x)) / sigma).ravel()
    se = 1 / math.sqrt(n.size)
    assert abs(n.mean()) < 4 * se and abs(n.std() - 1) < 4 * se / math.sqrt(2) + 1e-3
    if prev is not None:
      assert abs(np.corrcoef(n, prev)[0, 1]) < 4 * se
    prev = n
  np.testing.assert_allclose(seen[0]["x"], alpha_sigma(seen[0]["logsnr"])[1] * noise, atol=1e-4)


def test_inpaint_renoise_is_the_forward_transition():
  # If z_s ~ q(z_s | x) then renoise(z_s) ~ q(z_t | x) = N(alpha_t x, sigma_t^2).
  n, x, ls, lt = 200_000, 0.7, 2.0, -1.0
  k1, k2 = jax.random.split(jax.random.key(4))
  a_s, s_s = alpha_sigma(jnp.float32(ls))
  a_t, s_t = alpha_sigma(jnp.float32(lt))
  z_s = a_s * x + s_s * jax.random.normal(k1, (n,))
  z_t = np.asarray(editing.renoise(z_s, ls, lt, jax.random.normal(k2, (n,))), np.float64)
  assert abs(z_t.mean() - float(a_t) * x) < 4 * float(s_t) / math.sqrt(n)
  assert abs(z_t.std() - float(s_t)) < 4 * float(s_t) / math.sqrt(2 * n)
  grid, back = editing.resample_plan(3, 4)
  assert grid.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2]
  assert back.tolist() == [True, True, True, False] * 2 + [False]


def test_inpaint_mask_resize_is_min_pool_down_and_nearest_up():
  m = np.zeros((1, 4, 4, 1), np.float32)
  m[0, :3, :3] = 1.0  # the top-left 2x2 block fully known, its neighbours partly
  down = np.asarray(editing.resize_mask(m, 2))[0, ..., 0]
  np.testing.assert_array_equal(down, [[1.0, 0.0], [0.0, 0.0]])
  up = np.asarray(editing.resize_mask(down[None, ..., None], 4))[0, ..., 0]
  np.testing.assert_array_equal(up, np.kron(down, np.ones((2, 2))))
  x = np.full((1, 8, 8, 3), 0.5, np.float32)
  np.testing.assert_allclose(editing.resize_image(x, 4), np.full((1, 4, 4, 3), 0.5), atol=1e-6)
  with pytest.raises(ValueError, match="from 4px to 3px; allowed: sizes that divide"):
    editing.resize_mask(m, 3)


def _sample(**kw):
  noise = jnp.zeros((2, 2, 4, 1))
  args = dict(schedule="cosine", settings=SM.SamplerSettings(num_steps=3))
  return SM.sample(correlated_denoiser, None, noise, kw.pop("rng", jax.random.key(0)), **args, **kw)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(mask=jnp.ones((2, 2, 4, 1))), "needs init_image"),
        (dict(init_image=jnp.zeros((2, 4, 4, 1))), r"init_image has shape \(2, 4, 4, 1\); allowed"),
        (dict(init_image=jnp.full((2, 2, 4, 1), 2.0)), r"values must be in \[-1, 1\].*max 2"),
        (dict(init_image=jnp.zeros((2, 2, 4, 1)), mask=jnp.ones((2, 2, 2, 1))), "mask has shape"),
        (
            dict(init_image=jnp.zeros((2, 2, 4, 1)), mask=jnp.full((2, 2, 4, 1), 255.0)),
            r"mask values must be in \[0, 1\] \(1 = known.*max 255",
        ),
        (
            dict(init_image=jnp.zeros((2, 2, 4, 1)), edit=editing.EditSettings(resample_steps=3)),
            "resample_steps=3 is RePaint's.*pass a mask",
        ),
        (
            dict(init_image=jnp.zeros((2, 2, 4, 1)), mask=jnp.ones((2, 2, 4, 1)), rng=None),
            "inpainting re-noises the known region.*pass a PRNG key",
        ),
    ],
)
def test_inpaint_bad_inputs_fail_clearly(kw, match):
  with pytest.raises(ValueError, match=match):
    _sample(**kw)


def test_inpaint_resampling_refuses_a_multistep_sampler_and_bad_counts():
  with pytest.raises(ValueError, match="multistep sampler \\('dpmpp_2m'\\)"):
    SM.sample(
        correlated_denoiser,
        None,
        jnp.zeros((2, 2, 4, 1)),
        jax.random.key(0),
        schedule="cosine",
        settings=SM.SamplerSettings(sampler="dpmpp_2m", num_steps=3),
        init_image=jnp.zeros((2, 2, 4, 1)),
        mask=jnp.ones((2, 2, 4, 1)),
        edit=editing.EditSettings(resample_steps=2),
    )
  with pytest.raises(ValueError, match="resample_steps must be a static int >= 1.*got 0"):
    editing.EditSettings(resample_steps=0)


@pytest.fixture(scope="module")
def tiny_cascade():
  return cascade.Cascade.from_workdirs(cascade_fixtures.shared_tiny_cascade())


def test_cascade_inpaint_keeps_the_known_region_at_every_stage(tiny_cascade):
  rng = np.random.default_rng(5)
  x = rng.uniform(-1, 1, (10, 32, 32, 3)).astype(np.float32)  # one image per prompt
  mask = np.zeros((32, 32), np.float32)
  mask[:, :13] = 1.0  # known: the left 13 columns; at 16px only the left 6 are fully known
  settings = [
      cascade.SamplingSettings(num_steps=3, guidance_weight=2.0),
      cascade.SamplingSettings(num_steps=2, aug_level=0.1),
  ]
  prompts = ["a red circle", "a blue square", "a green triangle", "", "a circle"] * 2
  # Per stage: stage 1 also starts from the noised image at t = 0.6 (SDEdit). Two batches of
  # 8 (the second padded): each prompt keeps its own image.
  edit = [editing.EditSettings(strength=0.6, resample_steps=2), editing.EditSettings()]
  a = tiny_cascade.sample(
      prompts, settings, seed=1, batch_size=8, init_image=x, mask=mask, edit=edit, progress=False
  )
  assert [o.shape for o in a] == [(10, 16, 16, 3), (10, 32, 32, 3)]
  x16 = np.asarray(editing.resize_image(x, 16))
  np.testing.assert_array_equal(a[0][:, :, :6], x16[:, :, :6])
  np.testing.assert_array_equal(a[1][:, :, :13], x[:, :, :13])
  assert np.abs(a[0][:, :, 6:] - x16[:, :, 6:]).mean() > 0.1  # regenerated, not copied
  assert np.abs(a[1][:, :, 13:] - x[:, :, 13:]).mean() > 0.1
  # The AOT path: the editing program lowers from sharded abstract inputs alone.
  abstract = stage_sampler.abstract_sampler_inputs(
      tiny_cascade.stages[1].stage,
      8,
      tiny_cascade.mesh,
      tiny_cascade.rules,
      fsdp_min_size=tiny_cascade.fsdp_min_sizes[1],
      edit=edit[1],
  )
  assert abstract[-2].shape == (8, 32, 32, 3) and abstract[-1].shape == (8, 32, 32, 1)
  lowered = tiny_cascade.sampler(1, settings[1], edit[1]).lower(*abstract)
  assert lowered.out_info.shape == (8, 32, 32, 3)
  with pytest.raises(ValueError, match=r"mask has shape \(16, 16\); allowed: \[32, 32\]"):
    tiny_cascade.sample(prompts, settings, init_image=x, mask=mask[:16, :16], progress=False)
  with pytest.raises(ValueError, match=r"init_image has shape \(10, 16, 16, 3\); allowed"):
    tiny_cascade.sample(prompts, settings, init_image=x[:, :16, :16], progress=False)


@pytest.mark.slow
def test_cascade_img2img_small_strength_stays_near_the_init_image(tiny_cascade):
  x = np.random.default_rng(7).uniform(-1, 1, (16, 16, 3)).astype(np.float32)
  settings = [cascade.SamplingSettings(num_steps=4, guidance_weight=2.0)]  # stage 1 alone
  prompts = ["a red circle", "a blue square"]
  (plain,) = tiny_cascade.sample(prompts, settings, seed=2, progress=False)
  (near,) = tiny_cascade.sample(
      prompts, settings, seed=2, init_image=x, edit=editing.EditSettings(0.1), progress=False
  )
  # A random network: from pure noise it lands anywhere; from t = 0.1 (alpha 0.99, sigma 0.16)
  # its one step moves x by ~sigma / alpha |eps - eps_hat|.
  assert np.abs(near - x).mean() < 0.5 * np.abs(plain - x).mean()
  with pytest.raises(ValueError, match=r"edit must be an EditSettings or 1 of them"):
    tiny_cascade.sample(prompts, settings, init_image=x, edit=[editing.EditSettings()] * 2)


def test_sample_cli_inpaint_reads_pngs_of_the_last_stage_size(tmp_path):
  # In a child process: imagen_jax.sampling defines absl flags that other test modules define too.
  mask = np.zeros((16, 32), np.uint8)
  PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
  square = np.tril(np.full((32, 32), 255, np.uint8))
  PIL.Image.fromarray(square).save(tmp_path / "square.png")
  script = f"""
import numpy as np
from absl import app
from imagen_jax.sampling import main as sample
for path, flag in (("mask.png", "mask"), ("nowhere.png", "init_image")):
  try:
    sample.read_png({str(tmp_path)!r} + "/" + path, 32, flag, "L")
  except app.UsageError as e:
    print("UsageError:", e)
np.save({str(tmp_path / "read.npy")!r}, sample.read_png({str(tmp_path / "square.png")!r}, 32, "m", "L"))
"""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-c", script],
      capture_output=True,
      text=True,
      cwd=root,
      env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu"),
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  errors = [line for line in proc.stdout.splitlines() if line.startswith("UsageError:")]
  assert len(errors) == 2, proc.stdout
  assert re.search(r"--mask=.* is 32x16; allowed: 32x32", errors[0]), errors[0]
  assert re.search(r"--init_image=.* does not exist", errors[1]), errors[1]
  np.testing.assert_array_equal(np.load(tmp_path / "read.npy"), square)


def test_sample_cli_inpaint_and_img2img_flags(tmp_path):
  rng = np.random.default_rng(6)
  init = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  mask = np.zeros((32, 32), np.uint8)
  mask[16:] = 255  # white = known: the bottom half is kept
  PIL.Image.fromarray(init).save(tmp_path / "init.png")
  PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
  out = tmp_path / "out"
  proc = cascade_fixtures.run_sample_cli(
      "--prompt=a red circle",
      "--num_per_prompt=2",
      f"--outdir={out}",
      f"--init_image={tmp_path / 'init.png'}",
      f"--mask={tmp_path / 'mask.png'}",
      "--strength=0.7",
      "--resample_steps=2",
      batch_size=8,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  # The PNG round trip is exact (to_uint8 inverts from_uint8), so the known half is too.
  assert images.to_uint8(images.from_uint8(init)).tolist() == init.tolist()
  for i in range(2):
    with PIL.Image.open(out / "stage2" / f"{i:04d}.png") as im:
      img = np.asarray(im)
    np.testing.assert_array_equal(img[16:], init[16:])  # the known half, pixel for pixel
    assert np.abs(img[:16].astype(int) - init[:16]).mean() > 10
  edit = json.loads((out / "settings.json").read_text())["edit"]
  assert edit["strength"] == 0.7 and edit["resample_steps"] == 2
