"""DeepFloyd IF stages in our cascade: diffusers folders (written by `save_params` from random
reduced IF-I / IF-II networks) loaded as stages I -> II, sampled with IF's DDPM and our DDIM,
with negative prompts in the unconditional half of guidance."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from imagen_jax.nn import deepfloyd, deepfloyd_checkpoint
from imagen_jax.nn.deepfloyd_config import IFConfig
from imagen_jax.sampling import cascade, deepfloyd_stage
from imagen_jax.stage import SamplingSettings

# One worker takes the module, so its module fixtures (the cascade's compiled samplers) are
# built once, not once per xdist worker.
pytestmark = pytest.mark.xdist_group("deepfloyd_cascade")

BASE = dict(
    act_fn="gelu",
    time_embedding_act_fn="gelu",
    resnet_time_scale_shift="scale_shift",
    resnet_skip_time_act=True,
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    encoder_hid_dim=256,  # byt5-tiny-random's width (IF: T5-XXL's 4096)
    encoder_hid_dim_type="text_proj",
    cross_attention_dim=8,
    addition_embed_type="text",
    addition_embed_type_num_heads=4,
    norm_num_groups=4,
    block_out_channels=[4, 8],
    layers_per_block=1,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    attention_head_dim=4,
    out_channels=6,
)
IF_I = dict(BASE, in_channels=3, sample_size=16)
IF_II = dict(BASE, in_channels=6, sample_size=32, class_embed_type="timestep")


def _write(folder, cfg, seed):
  model = deepfloyd.IFUNet(IFConfig.from_dict(cfg))
  c = model.config
  x = jnp.zeros((1, 8, 8, c.in_channels))
  noise = jnp.zeros((1,)) if c.is_sr else None

  # Shapes from a trace, values from numpy: run op by op, Flax's init compiles hundreds of tiny
  # programs. Every weight is random (a dropped bias or a swapped norm would show): a unit
  # scale or fan-in-scaled kernel plus 0.1 noise.
  shapes = jax.eval_shape(
      model.init, jax.random.key(seed), x, jnp.zeros((1,)), jnp.zeros((1, 3, 256)), None, noise
  )
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    name = jax.tree_util.keystr(path)
    base = np.ones(leaf.shape) if "scale" in name else np.zeros(leaf.shape)
    if leaf.ndim >= 2:  # kernels and embeddings, fan-in scaled
      base = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    return jnp.asarray(base + 0.1 * rng.normal(size=leaf.shape), leaf.dtype)

  params = jax.tree_util.tree_map_with_path(value, nn.unbox(shapes["params"]))
  deepfloyd_checkpoint.save_params(str(folder), cfg, params)
  return params


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("deepfloyd")
  p1 = _write(root / "IF-I" / "unet", IF_I, 0)
  p2 = _write(root / "IF-II" / "unet", IF_II, 5)
  return str(root / "IF-I" / "unet"), str(root / "IF-II" / "unet"), p1, p2


BLOCK = ml_collections.ConfigDict(
    dict(
        text_name="byt5-tiny-random",
        text_max_length=16,
        dtype="float32",
        param_dtype="float32",
        logical_axis_rules=common.LOGICAL_AXIS_RULES,
        fsdp_min_size=0,
        lowres_size=16,
    )
)


@pytest.fixture(scope="module")
def model(folders):
  return cascade.Cascade.from_workdirs(list(folders[:2]), deepfloyd=BLOCK)


def test_save_load_round_trip(folders):
  m, params = deepfloyd_checkpoint.load(folders[0])
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(folders[2])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert deepfloyd_stage.is_diffusers_unet(folders[1]) and not deepfloyd_stage.is_diffusers_unet(
      "/nonexistent"
  )


def test_stages_and_sizes(model):
  s1, s2 = (s.stage for s in model.stages)
  assert s1.is_deepfloyd and not s1.is_sr and s1.image_size == 16
  assert s2.is_sr and s2.lowres_size == 16 and s2.image_size == 32
  assert cascade.stage_image_size(model.stages[1].workdir) == 32


IF_DDPM = [
    SamplingSettings(
        sampler="ddpm", num_steps=3, guidance_weight=3.0, percentile=95.0, max_scale=1.5
    ),
    SamplingSettings(
        sampler="ddpm",
        num_steps=2,
        guidance_weight=2.0,
        percentile=95.0,
        max_scale=1.5,
        aug_level=0.25,
    ),
]


@pytest.mark.slow
def test_if_ddpm_cascade_and_negative_prompts(model):
  prompts = ["a red circle", "a blue square"]
  outs = model.sample(prompts, IF_DDPM, seed=1, batch_size=8, progress=False)
  assert [o.shape for o in outs] == [(2, 16, 16, 3), (2, 32, 32, 3)]
  assert all(np.isfinite(o).all() and np.abs(o).max() <= 1.0 + 1e-6 for o in outs)
  again = model.sample(prompts, IF_DDPM, seed=1, batch_size=8, progress=False)
  np.testing.assert_array_equal(outs[1], again[1])
  # IF's unconditional half reads "" when no negative prompt is given: the same images.
  empty = model.sample(
      prompts, IF_DDPM, seed=1, batch_size=8, progress=False, negative_prompts=["", ""]
  )
  np.testing.assert_allclose(empty[1], outs[1], atol=1e-6)
  neg = model.sample(
      prompts, IF_DDPM, seed=1, batch_size=8, progress=False, negative_prompts=["green", "green"]
  )
  assert np.abs(neg[0] - outs[0]).max() > 1e-4
  with pytest.raises(ValueError, match="negative prompts"):
    model.sample(prompts, IF_DDPM, negative_prompts=["x"], progress=False)


@pytest.mark.slow
def test_ddim_on_an_if_stage(model):
  st = [dataclasses.replace(IF_DDPM[0], sampler="ddim", num_steps=3)]
  (out,) = model.sample(["a red circle"], st, seed=0, batch_size=8, progress=False)
  assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()


def test_negative_prompt_is_the_unconditional_half(model):
  """eps = w eps(text) + (1 - w) eps(negative) with cond's uncond_text_emb (denoiser)."""
  st = model.stages[0]
  emb, mask = model.encode(["a red circle"] * 8)
  neg, neg_mask = model.encode(["green"] * 8)
  z = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  logsnr = jnp.full((8,), -1.0)
  cond = {"text_emb": emb, "text_mask": mask}
  guided = st.stage.denoise_fn(st.params, 3.0)(
      z, logsnr, dict(cond, uncond_text_emb=neg, uncond_text_mask=neg_mask)
  )
  e_c = st.stage.denoise_fn(st.params)(z, logsnr, cond)
  e_u = st.stage.denoise_fn(st.params)(z, logsnr, {"text_emb": neg, "text_mask": neg_mask})
  assert np.abs(e_c - e_u).max() > 1e-4  # the texts differ, so the check below can fail
  np.testing.assert_allclose(guided, 3.0 * e_c - 2.0 * e_u, atol=1e-4)


def test_t5_keeps_padding_outputs_for_if():
  """IF reads T5's outputs at padding (zero_padding=False); real tokens are unchanged."""
  from imagen_jax.text import registry

  on = registry.get_text_encoder(
      ml_collections.ConfigDict(dict(name="byt5-tiny-random", max_length=12))
  )
  off = registry.get_text_encoder(
      ml_collections.ConfigDict(dict(name="byt5-tiny-random", max_length=12, zero_padding=False))
  )
  (e_on, m), (e_off, _) = on.encode(["a red"]), off.encode(["a red"])
  m = np.asarray(m)
  np.testing.assert_allclose(np.asarray(e_off)[m], np.asarray(e_on)[m], atol=1e-6)
  assert np.abs(np.asarray(e_on)[~m]).max() == 0 and np.abs(np.asarray(e_off)[~m]).min() > 0
