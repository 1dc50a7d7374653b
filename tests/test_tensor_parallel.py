"""Model parallelism over the `tensor` mesh axis (`pytest -k tensor` selects these).

The logical-axis rules (configs/common.py) give params and activations disjoint names, so no
layout depends on rule order; with tensor > 1 the networks' channels, heads and hidden widths
split over `tensor`. On 8 fake CPU devices a data x fsdp x tensor = 2 x 2 x 2 mesh with the
activation constraints on must equal one device for the tiny base U-Net and the tiny
Efficient U-Nets: training steps and the guided denoiser.

Tolerance (as tests/test_train_step.py): sharded and single-device programs differ only in
how XLA splits reductions (batch means, conv contractions split over tensor then
reduce-scattered), i.e. float32 summation order.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import common
from imagen_jax import stage as stage_lib
from imagen_jax.nn import layers, unet
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import sharding as sh
from imagen_jax.text import registry
from tests.test_train_step import copy, load_config, run, setup

MESH_222 = {"data": 2, "fsdp": 2, "tensor": 2}
STAGES = ("base64", "sr256", "sr1024")


def _rule_names(rules):
  return {name for name, _ in rules}


def _stage(name):
  config = load_config(name)
  return config, stage_lib.Stage.from_config(config)


def _activation_names(st):
  """Every logical-name tuple the network passes to `layers.constrain` (recorded by tracing one
  abstract forward pass)."""
  seen = set()
  original = layers.constrain

  def record(x, names):
    seen.add(tuple(names))
    return original(x, names)

  inputs = st.model_inputs(batch=2)
  abstract = st.abstract_params()
  layers.constrain = record
  try:
    jax.eval_shape(lambda p, kw: st.model.apply({"params": p}, **kw), abstract, inputs)
  finally:
    layers.constrain = original
  return seen


def _uses(spec, axis):
  return any(axis == e or (isinstance(e, tuple) and axis in e) for e in spec)


def _flat_specs(specs):
  return jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]


@pytest.mark.parametrize("name", STAGES)
def test_tensor_rules_do_not_depend_on_order(name):
  """Params and activations use disjoint names, each with its own rule; reversing or shuffling
  the rules table gives the same mesh specs for every param and every activation."""
  params_rules, act_rules = common.PARAM_AXIS_RULES, common.ACTIVATION_AXIS_RULES
  assert not _rule_names(params_rules) & _rule_names(act_rules)
  _, st = _stage(name)
  mesh = mesh_lib.make_mesh(MESH_222)
  acts = _activation_names(st)
  act_names = {n for names in acts for n in names if n is not None}
  param_names = {
      n
      for names in jax.tree.leaves(
          nn.get_partition_spec(st.abstract_boxed_params()), is_leaf=lambda x: isinstance(x, P)
      )
      for n in names
      if n is not None
  }
  assert act_names <= _rule_names(act_rules), act_names - _rule_names(act_rules)
  assert param_names <= _rule_names(params_rules), param_names - _rule_names(params_rules)
  assert "activation_batch" in act_names and "activation_embed" in act_names

  rules = list(common.LOGICAL_AXIS_RULES)
  rng = np.random.default_rng(0)
  orders = [rules, rules[::-1]] + [
      [rules[i] for i in rng.permutation(len(rules))] for _ in range(3)
  ]
  results = []
  for order in orders:
    p_specs = st.param_specs(mesh, order)
    a_specs = {names: nn.logical_to_mesh_axes(names, order) for names in acts}
    results.append((jax.tree.leaves(p_specs, is_leaf=lambda x: isinstance(x, P)), a_specs))
  for got in results[1:]:
    assert got == results[0]
  # No tensor maps two dims to one mesh axis (flax would then drop one by rule order).
  for spec in list(results[0][1].values()) + results[0][0]:
    axes = [a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)]
    assert len(axes) == len(set(axes)), spec


def test_tensor_rule_checks_and_batch_axes():
  with pytest.raises(ValueError, match="'embed' has more than one rule"):
    sh.check_rules([("embed", "fsdp"), ("embed", "tensor")])
  with pytest.raises(ValueError, match="must be \\(logical_name, mesh_axes\\)"):
    sh.check_rules([("embed",)])
  # The trainer's batch split is the networks' activation batch split.
  assert sh.batch_axes(common.LOGICAL_AXIS_RULES) == ("data", "fsdp")
  mesh = mesh_lib.make_mesh(MESH_222)
  assert sh.batch_axes(common.LOGICAL_AXIS_RULES, mesh) == ("data", "fsdp")


@pytest.mark.parametrize("name", STAGES)
def test_tensor_axis_splits_params_and_keeps_fsdp(name):
  """On a 2 x 2 x 2 mesh, conv kernels (C_in), hidden widths and heads split over tensor, while
  every big param still splits over fsdp (ZeRO-3); on a tensor = 1 mesh no spec names tensor."""
  _, st = _stage(name)
  rules = common.LOGICAL_AXIS_RULES
  min_size = 1 << 10  # the tiny networks' params are small: lower the fallback threshold
  flat = _flat_specs(st.param_specs(mesh_lib.make_mesh(MESH_222), rules, fsdp_min_size=min_size))
  shapes = jax.tree.leaves(st.abstract_params())
  tensor_split = [jax.tree_util.keystr(p) for p, s in flat if _uses(s, "tensor")]
  assert any(len(s) == 4 and s[2] == "tensor" for _, s in flat), "no conv kernel splits C_in"
  assert any("qkv" in k or "text_kv" in k for k in tensor_split), tensor_split
  for (path, spec), leaf in zip(flat, shapes):
    if leaf.size >= min_size:
      assert _uses(spec, "fsdp"), (jax.tree_util.keystr(path), spec)
  mesh1 = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  assert not any(_uses(s, "tensor") for _, s in _flat_specs(st.param_specs(mesh1, rules)))


def _tiny_kw(name):
  config = load_config(name)
  encoder = registry.get_text_encoder(config.text)
  kw = dict(
      model=unet.build_model(config.model),
      encode=encoder.encode_tokens,
      text_len=encoder.max_length,
      text_dim=encoder.dim,
      size=config.image_size,
  )
  batch_kw = dict(size=config.image_size, text_len=encoder.max_length, vocab=200)
  return encoder, kw, batch_kw


@pytest.mark.slow
@pytest.mark.parametrize("name", STAGES)
def test_tensor_parallel_training_equals_one_device(name):
  """2 Adam steps of the tiny network (frozen tiny T5 inside the step) on one device and on a
  data x fsdp x tensor = 2 x 2 x 2 mesh with `mesh.constrain_activations`: same losses and
  params (tolerance: module docstring)."""
  encoder, kw, batch_kw = _tiny_kw(name)
  _, _, step1, s1, _, sh1 = setup(name, **kw)
  _, _, step8, s8, _, sh8 = setup(
      name, MESH_222, devices=jax.devices(), **kw, **{"mesh.constrain_activations": True}
  )
  split = [s.sharding.spec for s in jax.tree.leaves(s8.params)]
  assert any(_uses(s, "tensor") for s in split) and any(_uses(s, "fsdp") for s in split)
  s1, m1 = run(step1, s1, sh1, name, 2, encoder.params, **batch_kw)
  s8, m8 = run(step8, s8, sh8, name, 2, encoder.params, **batch_kw)
  np.testing.assert_allclose([m["loss"] for m in m1], [m["loss"] for m in m8], rtol=1e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
      copy(s1.params),
      copy(s8.params),
  )


@pytest.mark.slow
@pytest.mark.parametrize("name", STAGES)
def test_tensor_parallel_denoiser_equals_one_device(name):
  """The guided denoiser (`Stage.denoise_fn`, w = 3: conditional and unconditional halves) of
  the tiny network, jitted with params laid out by `stage.param_specs` on a 2 x 2 x 2 mesh under
  the rules, equals the single-device denoiser."""
  config, st = _stage(name)
  params = st.init_params(jax.random.key(0))
  b, s = 8, st.train_image_size
  k = jax.random.split(jax.random.key(1), 5)
  z = jax.random.normal(k[0], (b, s, s, 3))
  logsnr = jnp.linspace(-5.0, 5.0, b)
  emb = jax.random.normal(k[1], (b, st.text_len, st.text_dim))
  mask = jnp.arange(st.text_len)[None, :] < jnp.arange(1, b + 1)[:, None] % st.text_len + 1
  sr = {}
  if st.is_sr:
    lowres = jax.random.uniform(k[2], (b, st.train_lowres_size, st.train_lowres_size, 3))
    aug_noise = jax.random.normal(k[3], z.shape)
    sr = dict(lowres=lowres * 2 - 1, aug_level=jnp.full((b,), 0.1), aug_noise=aug_noise)

  def denoise(p, z, logsnr, emb, mask, lowres=None, aug_level=None, aug_noise=None):
    cond = st.condition(emb, mask, lowres, aug_level=aug_level, aug_noise=aug_noise)
    return st.denoise_fn(p, 3.0)(z, logsnr, cond)

  want = jax.jit(denoise)(params, z, logsnr, emb, mask, **sr)

  mesh = mesh_lib.make_mesh(MESH_222)
  rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
  specs = st.param_specs(mesh, rules, fsdp_min_size=config.mesh.fsdp_min_size)
  p_sh = jax.device_put(params, sh.to_named(specs, mesh))
  assert any(_uses(x.sharding.spec, "tensor") for x in jax.tree.leaves(p_sh))
  batch = NamedSharding(mesh, P(sh.batch_axes(rules, mesh)))
  args = jax.device_put((z, logsnr, emb, mask), batch)
  sr = jax.device_put(sr, batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    got = jax.jit(denoise)(p_sh, *args, **sr)
  assert got.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_tensor_rules_for_a_mesh_without_tensor():
  """Activation constraints refuse mesh axes the mesh lacks: the step restricts the rules."""
  mesh = mesh_lib.make_mesh({"data": -1})
  rules = dict(sh.rules_for_mesh(common.LOGICAL_AXIS_RULES, mesh))
  assert rules["activation_batch"] == "data"
  assert rules["activation_embed"] is None and rules["conv_in"] is None
  assert set(rules) == {name for name, _ in common.LOGICAL_AXIS_RULES}
