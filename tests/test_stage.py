"""The stage layer: what it builds from a config, the conditioning it forms (SR noise
conditioning augmentation and the null text, against their formulas), and the abstract params."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import stage as stage_lib
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import registry
from tests.test_train_step import load_config, toy_stage


@pytest.mark.parametrize("name", ["base64", "sr256", "sr1024"])
def test_stage_from_config(name):
  config = load_config(name)
  st = stage_lib.Stage.from_config(config)
  assert st.is_sr == (name != "base64")
  assert st.text_dim == registry.text_dim(config.text)
  assert st.text_len == config.text.max_length
  assert (st.image_size, st.lowres_size) == (config.image_size, config.lowres_size)
  assert (st.train_image_size, st.train_lowres_size) == stage_lib.train_sizes(config)
  assert st.target == config.diffusion.target
  t = jnp.linspace(0.0, 1.0, 5)
  np.testing.assert_array_equal(
      st.schedule.logsnr_fn(t), stage_lib.make_schedule(config.diffusion).logsnr_fn(t)
  )


def test_sr1024_trains_on_aligned_crops():
  config = load_config("sr1024")
  with config.unlocked():
    config.image_size, config.lowres_size, config.data.sr_crop_size = 1024, 256, 256
  st = stage_lib.Stage.from_config(config)
  assert (st.train_image_size, st.train_lowres_size) == (256, 64)
  assert st.model_inputs()["x_t"].shape == (1, 256, 256, 3)


@pytest.mark.parametrize(
    "path, value, match",
    [
        ("diffusion.target", "w", "diffusion.target 'w'.*allowed: eps, v, x0"),
        ("diffusion.schedule", "sqrt", "diffusion.schedule 'sqrt'"),
    ],
)
def test_bad_stage_settings_are_clear_errors(path, value, match):
  config = load_config("sr256")
  section, field = path.split(".")
  config[section][field] = value
  with pytest.raises(ValueError, match=match):
    stage_lib.Stage.from_config(config)


def test_sr_condition_is_upsample_then_noise_augmentation():
  """lowres = cos(pi/2 aug) * up(x_lr) + sin(pi/2 aug) * noise, with up the clipped bicubic
  resize to the output size (Imagen §2.4, App. D.2); aug_level is passed to the net."""
  st = stage_lib.Stage.from_config(load_config("sr256"))
  b, h, s = 4, 8, 16
  k = jax.random.split(jax.random.key(0), 4)
  lowres = jax.random.uniform(k[0], (b, h, h, 3), minval=-1.0, maxval=1.0)
  noise = jax.random.normal(k[1], (b, s, s, 3))
  emb = jax.random.normal(k[2], (b, 5, 7))
  mask = jnp.arange(5)[None, :] < jnp.array([[1], [2], [5], [3]])
  aug = jnp.array([0.0, 0.25, 0.5, 1.0])
  cond = st.condition(emb, mask, lowres, aug_level=aug, aug_noise=noise)
  assert set(cond) == {"text_emb", "text_mask", "lowres", "aug_level"}
  up = np.clip(np.asarray(jax.image.resize(lowres, (b, s, s, 3), "bicubic")), -1, 1)
  a = np.cos(0.5 * math.pi * np.asarray(aug))[:, None, None, None]
  sg = np.sin(0.5 * math.pi * np.asarray(aug))[:, None, None, None]
  want = a * up + sg * np.asarray(noise)
  np.testing.assert_allclose(cond["lowres"], want, atol=1e-5)
  np.testing.assert_allclose(cond["lowres"][0], up[0], atol=1e-6)  # aug 0: the upsampled image
  np.testing.assert_allclose(cond["lowres"][3], noise[3], atol=1e-6)  # aug 1: pure noise
  np.testing.assert_array_equal(cond["aug_level"], aug)
  np.testing.assert_array_equal(cond["text_emb"], emb)
  np.testing.assert_array_equal(cond["text_mask"], mask)


def test_condition_refuses_the_wrong_kind_of_input():
  base = stage_lib.Stage.from_config(load_config("base64"))
  sr = stage_lib.Stage.from_config(load_config("sr256"))
  emb, mask = jnp.zeros((1, 5, 7)), jnp.ones((1, 5), bool)
  assert set(base.condition(emb, mask)) == {"text_emb", "text_mask"}
  with pytest.raises(ValueError, match="base64 takes no low-res input"):
    base.condition(emb, mask, jnp.zeros((1, 4, 4, 3)))
  with pytest.raises(ValueError, match="sr256 needs low-res input"):
    sr.condition(emb, mask)
  with pytest.raises(ValueError, match="needs aug_level"):
    sr.condition(emb, mask, jnp.zeros((1, 4, 4, 3)))


def test_text_embeddings_come_from_the_cache_or_the_encoder():
  st = toy_stage(load_config("base64"), text_dim=4)
  emb = jnp.ones((2, 3, 4))
  mask = jnp.array([[1, 0, 0], [1, 1, 1]], bool)
  got, got_mask = st.text_embeddings({"text_emb": emb, "text_mask": mask}, None, None)
  np.testing.assert_array_equal(got, emb)
  table = jnp.arange(20.0).reshape(5, 4)
  encode = lambda params, ids, m: params[ids] * m[..., None]
  ids = jnp.array([[1, 2, 3], [4, 0, 1]])
  got, got_mask = st.text_embeddings({"text_ids": ids, "text_mask": mask}, encode, table)
  np.testing.assert_array_equal(got, table[ids] * mask[..., None])
  np.testing.assert_array_equal(got_mask, mask)
  with pytest.raises(ValueError, match="no text_emb and no text encoder"):
    st.text_embeddings({"text_ids": ids, "text_mask": mask}, None, None)
  with pytest.raises(ValueError, match="width D=6 .* reads D=4"):
    st.text_embeddings({"text_emb": jnp.ones((2, 3, 6)), "text_mask": mask}, None, None)


def test_null_condition_for_guidance():
  """Dropped text = zero embeddings and an all-False mask (§2.2), the same null text that
  guidance at w = 0 evaluates: denoise(w=0, c) == denoise(w=1, null)."""
  st = toy_stage(load_config("base64"))
  k = jax.random.split(jax.random.key(1), 3)
  emb = jax.random.normal(k[0], (3, st.text_len, st.text_dim))
  mask = jnp.ones((3, st.text_len), bool)
  keep = jnp.array([True, False, True])
  d_emb, d_mask = st.drop_text(emb, mask, keep)
  np.testing.assert_array_equal(d_emb[1], 0.0)
  assert not d_mask[1].any()
  np.testing.assert_array_equal(d_emb[::2], emb[::2])
  np.testing.assert_array_equal(d_mask[::2], mask[::2])

  params = st.init_params(jax.random.key(0))
  z = jax.random.normal(k[1], (3, 8, 8, 3))
  logsnr = jnp.array([-3.0, 0.0, 2.0])
  null_emb, null_mask = st.drop_text(emb, mask, jnp.zeros((3,), bool))
  uncond = st.denoise_fn(params, 1.0)(z, logsnr, st.condition(null_emb, null_mask))
  cond = st.denoise_fn(params, 1.0)(z, logsnr, st.condition(emb, mask))
  guided0 = st.denoise_fn(params, 0.0)(z, logsnr, st.condition(emb, mask))
  np.testing.assert_allclose(guided0, uncond, atol=1e-5)
  assert not np.allclose(cond, uncond, atol=1e-4)


def test_abstract_params_match_the_init_and_carry_their_shardings():
  st = toy_stage(load_config("sr256"))
  abstract = st.abstract_params()
  params = st.init_params(jax.random.key(0))
  assert jax.tree.structure(abstract) == jax.tree.structure(params)
  for a, p in zip(jax.tree.leaves(abstract), jax.tree.leaves(params)):
    assert (a.shape, a.dtype) == (p.shape, p.dtype)
  assert "aug" in params  # the SR path (aug_level) is part of the tree
  mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  rules = tuple(tuple(r) for r in load_config("sr256").mesh.logical_axis_rules)
  specs = st.param_specs(mesh, rules)
  assert specs["conv_in"]["kernel"] == jax.sharding.PartitionSpec(None, None, None, "fsdp")


def test_a_stage_is_a_static_jit_argument():
  """Hashed by identity (its config is a mutable ConfigDict): one compile per Stage object."""
  st = toy_stage(load_config("base64"))
  traces = []

  @functools.partial(jax.jit, static_argnames="stage")
  def f(x, *, stage):
    traces.append(stage)
    return x * stage.text_dim

  assert float(f(1.0, stage=st)) == st.text_dim
  f(2.0, stage=st)
  assert traces == [st]


def test_sampling_settings_from_a_stage_config_and_for_the_sampler():
  config = load_config("sr256")
  s = stage_lib.SamplingSettings.from_config(config.sample)  # the trainer's grid settings
  assert (s.num_steps, s.guidance_weight, s.aug_level) == (
      config.sample.num_steps,
      config.sample.guidance_weight,
      config.sample.aug_level,
  )
  assert (s.eta, s.time_grid) == (0.0, "uniform_t")
  ss = s.sampler_settings()
  assert (ss.sampler, ss.num_steps, ss.threshold, ss.time_grid) == (
      s.sampler,
      s.num_steps,
      s.threshold,
      "uniform_t",
  )
  with pytest.raises(ValueError, match="sqrt_t"):
    stage_lib.SamplingSettings(time_grid="sqrt_t").sampler_settings()


@pytest.mark.parametrize("w", [math.nan, math.inf, -math.inf])
def test_nonfinite_guidance_weight_refused_by_the_cascade_settings(w):
  """Inside the jitted sampler w is traced, so a NaN would only show as NaN images."""
  with pytest.raises(ValueError, match="guidance_weight"):
    stage_lib.SamplingSettings(guidance_weight=w)


@pytest.mark.parametrize("aug_level", [-0.1, 1.5])
def test_aug_level_outside_unit_interval_refused(aug_level):
  with pytest.raises(ValueError, match=r"aug_level=.* must be in \[0, 1\]"):
    stage_lib.SamplingSettings(aug_level=aug_level)
