"""Cascade sampling end to end on tiny random stages: determinism, prefixes, errors, and the
EMA params restored alone.

Stage workdirs are written the way the trainer writes them (config.json + an Orbax checkpoint
with the items train_state, ema_params, config) by tests/cascade_fixtures.py, with random
weights of traced shapes: sampling does not care whether the weights were trained, and this
skips the U-Net's init compile.
"""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import checkpoint as ckpt_lib
from imagen_jax.sampling import cascade, stage_sampler
from tests import cascade_fixtures


@pytest.fixture(scope="module")
def loaded(workdirs):
  return cascade.Cascade.from_workdirs(workdirs)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  # base: 16x16 text -> image; sr: 16 -> 32 (random weights with traced shapes, no init compile)
  return cascade_fixtures.write_tiny_cascade(str(tmp_path_factory.mktemp("cascade")))


SETTINGS = [
    cascade.SamplingSettings(num_steps=3, guidance_weight=3.0),
    cascade.SamplingSettings(num_steps=2, aug_level=0.2),
]
PROMPTS = ["a red circle in the center", "a small blue square on the left", ""]


def test_cascade_samples_end_to_end_and_is_deterministic(loaded):
  model = loaded
  assert [s.step for s in model.stages] == [7, 7]
  a = model.sample(PROMPTS, SETTINGS, seed=3, progress=False)
  assert [x.shape for x in a] == [(3, 16, 16, 3), (3, 32, 32, 3)]
  assert all(np.isfinite(x).all() and np.abs(x).max() <= 1.0 for x in a)
  b = model.sample(PROMPTS, SETTINGS, seed=3, progress=False)
  np.testing.assert_array_equal(a[1], b[1])
  c = model.sample(PROMPTS, SETTINGS, seed=4, progress=False)
  assert not np.allclose(a[0], c[0])
  # The cascade's stage 2 is conditioned on stage 1: the SR stage alone on stage 1's images
  # reproduces it, and on other low-res images gives other outputs.
  (sr_same,) = model.sample(PROMPTS, SETTINGS[1:], seed=3, lowres=a[0], progress=False)
  np.testing.assert_allclose(sr_same, a[1], atol=1e-5)
  (sr_other,) = model.sample(
      PROMPTS, SETTINGS[1:], seed=3, lowres=np.zeros_like(a[0]), progress=False
  )
  assert not np.allclose(sr_other, a[1], atol=1e-3)
  # A prefix (stage 1 only) gives stage 1's images.
  (x,) = model.sample(PROMPTS, SETTINGS[:1], seed=3, progress=False)
  np.testing.assert_allclose(x, a[0], atol=1e-6)


def test_sampling_is_sharded_over_devices_and_does_not_depend_on_them(loaded):
  # 8 fake CPU devices (conftest): by default all on fsdp; each batch is split over all of
  # them and the params are stored once over the mesh (tests/test_cascade_sharded.py: others).
  assert loaded.num_devices == jax.local_device_count() == 8
  assert dict(loaded.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert loaded.batch_multiple == 8
  stochastic = [
      dataclasses.replace(SETTINGS[0], eta=1.0),
      dataclasses.replace(SETTINGS[1], sampler="ddpm"),
  ]
  prompts = PROMPTS + ["a large green triangle above a small red circle"] * 7  # 10: padded
  sharded = loaded.sample(prompts, stochastic, seed=5, batch_size=16, progress=False)
  single = cascade.Cascade(loaded.stages, devices=jax.local_devices()[:1])
  # ... and in batches of 3: a sample's noise (initial and per step) depends on its index only.
  alone = single.sample(prompts, stochastic, seed=5, batch_size=3, progress=False)
  for a, b in zip(sharded, alone):
    np.testing.assert_allclose(a, b, atol=2e-5)
  assert not np.allclose(sharded[1][3], sharded[1][4])  # same prompt, other sample index


def test_per_sample_noise_does_not_depend_on_the_batch():
  key = jax.random.key(0)
  full = stage_sampler.initial_noise(key, jnp.arange(4), (4, 4, 3))
  part = stage_sampler.initial_noise(key, jnp.arange(2, 4), (4, 4, 3))
  np.testing.assert_array_equal(full[2:], part)


def test_missing_and_mismatched_stages_fail_clearly(workdirs, tmp_path):
  with pytest.raises(cascade.StageLoadError, match="config.json does not exist"):
    cascade.load_stage(str(tmp_path / "nowhere"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with open(workdirs[0] + "/config.json") as f:
    (empty / "config.json").write_text(f.read())
  with pytest.raises(cascade.StageLoadError, match="no complete checkpoint"):
    cascade.load_stage(str(empty))
  with pytest.raises(cascade.StageLoadError, match="stage 1 .* is an SR stage"):
    cascade.Cascade.from_workdirs([workdirs[1]])
  with pytest.raises(cascade.StageLoadError, match="is not an SR stage"):
    cascade.Cascade.from_workdirs([workdirs[0], workdirs[0]])
  # A checkpoint whose saved config no longer matches the network (edited config.json).
  bad = tmp_path / "bad"
  shutil.copytree(workdirs[0], bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["model"]["base_channels"] = 2 * cfg["model"]["base_channels"]
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ckpt_lib.CheckpointMismatchError):
    cascade.load_stage(str(bad))


def test_load_stage_restores_exactly_the_saved_ema_params(tmp_path):
  config = cascade_fixtures.tiny_config("base64")
  ema = cascade_fixtures.write_stage(str(tmp_path / "base"), config, seed=3, step=11)
  loaded = cascade.load_stage(str(tmp_path / "base"))
  assert loaded.step == 11 and not loaded.is_sr and loaded.image_size == 16
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params), jax.device_get(ema))


def test_old_layout_checkpoint_is_refused_for_sampling(workdirs, tmp_path):
  # The older layout kept the EMA params inside one `state` item with the optimizer.
  old = tmp_path / "old"
  shutil.copytree(workdirs[0], old)
  step_dir = old / "checkpoints" / "7"
  (step_dir / "train_state").rename(step_dir / "state")
  shutil.rmtree(step_dir / "ema_params")
  with pytest.raises(ckpt_lib.CheckpointLayoutError, match="older layout.*'state'.*own item"):
    cascade.load_stage(str(old))


def test_guided_denoise_fn_is_one_batched_pass_of_cfg(loaded):
  # The cascade's jitted denoiser step (stage_sampler.make_denoise_step) on its mesh.
  stage = loaded.stages[0]
  denoise = stage_sampler.make_denoise_step(
      stage.stage, loaded.mesh, loaded.rules, guided=True, fsdp_min_size=loaded.fsdp_min_sizes[0]
  )
  z = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  logsnr = jnp.linspace(-2.0, 1.0, 8)
  emb = jax.random.normal(jax.random.key(1), (8, 5, stage.stage.text_dim))
  mask = jnp.arange(5)[None, :] < jnp.arange(1, 9)[:, None] % 5 + 1
  cond = stage.stage.condition(emb, mask)
  eps = lambda w: np.asarray(denoise(stage.params, z, logsnr, cond, jnp.float32(w)))  # noqa: E731
  cond_eps, uncond = eps(1.0), eps(0.0)
  assert not np.allclose(cond_eps, uncond)
  np.testing.assert_allclose(eps(3.0), 3.0 * cond_eps - 2.0 * uncond, atol=2e-4)


def test_load_stage_refuses_another_text_encoder_fingerprint(tmp_path):
  """A stage trained on other weights under the same encoder name: loading it works (no
  encoder is built), building the cascade's encoder names both fingerprints."""
  config = cascade_fixtures.tiny_config("base64")
  cascade_fixtures.write_stage(str(tmp_path / "base"), config, fingerprint="0" * 16)
  stage = cascade.load_stage(str(tmp_path / "base"))
  with pytest.raises(
      cascade.StageLoadError,
      match=r"stage 1 .* fingerprint 0{16}, but text.path=None holds weights of fingerprint "
      r"[0-9a-f]{16}: other weights under the same name",
  ):
    cascade.Cascade([stage])


def test_load_stage_reads_the_checkpoint_config_and_refuses_a_relabelled_config_json(
    workdirs, tmp_path, caplog
):
  relabelled = tmp_path / "relabelled"
  shutil.copytree(workdirs[0], relabelled)
  cfg = json.loads((relabelled / "config.json").read_text())
  cfg["diffusion"]["target"] = "v"
  (relabelled / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(
      ckpt_lib.CheckpointMismatchError,
      match=r"disagree.*diffusion\.target: 'eps' in the checkpoint, config.json has 'v'",
  ):
    cascade.load_stage(str(relabelled))
  # Without config.json the checkpoint's own record rebuilds the stage.
  (relabelled / "config.json").unlink()
  loaded = cascade.load_stage(str(relabelled))
  assert loaded.stage.target == "eps" and loaded.step == 7
  assert "config.json is missing" in caplog.text
