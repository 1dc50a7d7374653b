"""Paper-size presets, checked with `jax.eval_shape` (nothing is allocated)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from configs import common
from imagen_jax.nn import layers, presets, unet
from imagen_jax.text import registry

# Params carry param names only (activations have their own `activation_*` names).
ALLOWED_NAMES = {name for name, _ in common.PARAM_AXIS_RULES} | {None}

# A rules list for these tests only (the project's rules live in configs/common.py).
TEST_RULES = [
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_in", None),
    ("kv", None),
    ("text_embed", None),
    ("norm", None),
]


def _abstract_params(stage, size="paper", batch=1):
  """(model config, abstract variables) with the text of the same-named stage config."""
  cfg = presets.get_model_config(stage, size)
  model = unet.build_model(cfg)
  text = common.text_config(size if size in common.VARIANTS else "shapes")
  s, length, dim = cfg.image_size, text.max_length, registry.text_dim(text)
  x = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32)
  kw = dict(
      x_t=x,
      logsnr=jax.ShapeDtypeStruct((batch,), jnp.float32),
      text_emb=jax.ShapeDtypeStruct((batch, length, dim), jnp.float32),
      text_mask=jax.ShapeDtypeStruct((batch, length), jnp.bool_),
  )
  if cfg.lowres_cond:
    kw.update(lowres=x, aug_level=jax.ShapeDtypeStruct((batch,), jnp.float32))
  return cfg, jax.eval_shape(lambda **a: model.init(jax.random.key(0), **a), **kw)


def _count(variables):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(variables)))


@pytest.mark.parametrize("stage,paper", [("base64", 2.0e9), ("sr256", 600e6)])
def test_paper_counts_within_20_percent(stage, paper):
  cfg, variables = _abstract_params(stage)
  assert registry.text_dim(common.text_config("paper")) == 4096  # T5-XXL (§2.1)
  assert "text_dim" not in cfg and "text_len" not in cfg  # the text block's, not the network's
  n = _count(variables)
  assert abs(n - paper) / paper < 0.2, f"{stage}: {n / 1e6:.1f}M vs paper {paper / 1e6:.0f}M"


def test_sr1024_is_f3_as_written():
  # F.3 = F.2 without self-attention: slightly smaller than SR256, nowhere near 400M
  # (see presets / report for the explanation of the paper's gap).
  _, v256 = _abstract_params("sr256")
  _, v1024 = _abstract_params("sr1024")
  n256, n1024 = _count(v256), _count(v1024)
  assert n1024 < n256 and n256 - n1024 < 0.05 * n256


@pytest.mark.parametrize("stage", ["base64", "sr256", "sr1024"])
def test_every_large_param_has_logical_names(stage):
  _, variables = _abstract_params(stage)
  flat = flatten_dict(variables["params"], sep="/")
  for path, leaf in flat.items():
    size = int(np.prod(nn.meta.unbox(leaf).shape))
    if isinstance(leaf, nn.LogicallyPartitioned):
      assert len(leaf.names) == len(leaf.value.shape), path
      assert set(leaf.names) <= ALLOWED_NAMES, (path, leaf.names)
    else:
      assert size <= 65536, f"{path} has {size} elements and no logical axis names"
  # Every param actually carries names here, and the names resolve under a rules list.
  specs = nn.get_partition_spec(variables)
  mesh_specs = nn.logical_to_mesh(specs, TEST_RULES)
  assert jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


@pytest.mark.parametrize(
    "stage,size", [("base64", "shapes"), ("sr256", "shapes"), ("base64", "bench")]
)
def test_small_presets_sizes(stage, size):
  cfg, variables = _abstract_params(stage, size)
  n = _count(variables)
  assert 1e6 < n < 3e7, n
  if stage == "sr256":
    assert cfg.space_to_depth == 4 and cfg.image_size == 64


def test_unknown_stage_or_size():
  with pytest.raises(ValueError, match="unknown stage 'sr512'"):
    presets.get_model_config("sr512", "paper")
  with pytest.raises(ValueError, match="unknown size 'bench' for stage 'sr256'"):
    presets.get_model_config("sr256", "bench")


def test_logsnr_embedding_is_bounded_and_monotone():
  logsnr = jnp.array([-1e4, -40.0, -5.0, 0.0, 5.0, 40.0, 1e4])
  u = layers.logsnr_to_unit(logsnr)
  assert np.isfinite(np.asarray(u)).all()
  assert (np.diff(np.asarray(u)) <= 0).all() and 0 <= float(u.min()) and float(u.max()) <= 1
  np.testing.assert_allclose(float(u[3]), 0.5, atol=1e-6)  # logsnr 0 <-> t = 1/2


def test_unknown_model_dtype_is_a_clear_error():
  config = presets.get_model_config("base64", "tiny")
  config.dtype = "fp8"
  with pytest.raises(
      ValueError, match=r"model.dtype='fp8'; allowed: \['bfloat16', 'float16', 'float32'\]"
  ):
    unet.build_model(config)
