"""Behaviour of the U-Nets on the `tiny` presets (CPU, a few seconds per compile).

To keep compiles few, each stage runs ONE jitted forward on a batch whose rows are variants of
one example (rows are independent: the networks have no batch statistics), and the tests
compare rows. Params are random (numpy, from the `eval_shape` of init), not `model.init`'s:
zero-initialised output layers (ADM's zero_module) would hide every path to the output, and
compiling `init` (one threefry per param) costs far more CPU time than the forward pass.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.nn import presets, unet

STAGES = ("base64", "sr256", "sr1024")
L, D = 5, 8  # text length and width of these tests (the networks infer D at init)


def _random_params(model, batch, seed=0):
  """Random params with the structure of model.init(...): no zero layers, O(1) activations."""
  shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), **batch)))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:  # norm scales around 1
      return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    if len(s.shape) <= 1:  # biases
      return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    fan_in = int(np.prod(s.shape[:-1]))
    return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _variants(cfg):
  """A batch of variants of example 0: rows named in the returned dict."""
  s, d = cfg.image_size, D
  k = jax.random.split(jax.random.key(1), 6)
  x = jax.random.normal(k[0], (1, s, s, 3))
  lowres = jax.random.normal(k[1], (1, s, s, 3))
  text = jax.random.normal(k[2], (1, L, d))
  mask = jnp.array([[True, True, True, False, False]])
  rows = {
      "base": (text, mask, lowres, 0.3),
      "other_text": (jax.random.normal(k[3], (1, L, d)), mask, lowres, 0.3),
      # Same real tokens; different (large) embeddings at the masked positions.
      "masked_changed": (
          text.at[:, 3:].set(100.0 * jax.random.normal(k[4], (1, 2, d))),
          mask,
          lowres,
          0.3,
      ),
      "dropped": (jnp.zeros_like(text), jnp.zeros_like(mask), lowres, 0.3),
      "other_lowres": (text, mask, lowres + 0.5 * jax.random.normal(k[5], lowres.shape), 0.3),
      "other_aug": (text, mask, lowres, 0.8),
  }
  names = list(rows)
  cat = lambda i: jnp.concatenate([rows[n][i] for n in names], axis=0)
  b = len(names)
  batch = dict(
      x_t=jnp.broadcast_to(x, (b, s, s, 3)),
      logsnr=jnp.full((b,), 1.5),
      text_emb=cat(0),
      text_mask=cat(1),
  )
  if cfg.lowres_cond:
    batch["lowres"] = cat(2)
    batch["aug_level"] = jnp.array([rows[n][3] for n in names], jnp.float32)
  return names, batch


@functools.lru_cache(maxsize=None)
def _run(stage):
  cfg = presets.get_model_config(stage, "tiny")
  model = unet.build_model(cfg)
  names, batch = _variants(cfg)
  params = _random_params(model, batch)
  out = jax.jit(lambda p, b: model.apply(p, **b))(params, batch)
  return cfg, {n: np.asarray(out[i]) for i, n in enumerate(names)}


@pytest.mark.parametrize("stage", STAGES)
def test_output_shape_dtype_and_finite(stage):
  cfg, out = _run(stage)
  for name, o in out.items():
    assert o.shape == (cfg.image_size, cfg.image_size, 3), name
    assert o.dtype == np.float32
    assert np.isfinite(o).all(), f"non-finite output for row {name!r}"


@pytest.mark.parametrize("stage", STAGES)
def test_text_conditioning_and_mask(stage):
  _, out = _run(stage)
  assert np.abs(out["other_text"] - out["base"]).max() > 1e-3, "text has no effect"
  assert np.abs(out["dropped"] - out["base"]).max() > 1e-3, "dropping text has no effect"
  # Masked tokens must have exactly no effect (up to float reassociation noise).
  np.testing.assert_allclose(out["masked_changed"], out["base"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("stage", ("sr256", "sr1024"))
def test_sr_uses_lowres_and_aug_level(stage):
  _, out = _run(stage)
  assert np.abs(out["other_lowres"] - out["base"]).max() > 1e-3, "lowres has no effect"
  assert np.abs(out["other_aug"] - out["base"]).max() > 1e-3, "aug_level has no effect"


def test_base_ignores_no_lowres_and_rejects_it():
  cfg = presets.get_model_config("base64", "tiny")
  model = unet.build_model(cfg)
  _, batch = _variants(cfg)
  with pytest.raises(ValueError, match="lowres_cond=False"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), **batch, lowres=batch["x_t"]))


def test_sr_requires_lowres_and_aug_level():
  cfg = presets.get_model_config("sr256", "tiny")
  model = unet.build_model(cfg)
  _, batch = _variants(cfg)
  with pytest.raises(ValueError, match="needs `lowres`"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), **{**batch, "lowres": None}))
  with pytest.raises(ValueError, match="aug_level"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), **{**batch, "aug_level": None}))


def _loss_and_grad(stage, remat, policy="nothing", lower_only=False):
  cfg = presets.get_model_config(stage, "tiny")
  if stage == "sr1024":  # one block only: a cheap compile that still remats every kind
    cfg.channels, cfg.num_res_blocks, cfg.strides = (8,), (1,), (2,)
    cfg.self_attention, cfg.text_cross_attention = (True,), (True,)
  cfg.remat, cfg.remat_policy = remat, policy
  cfg.dropout = 0.1  # exercise the dropout rng through remat as well
  model = unet.build_model(cfg)
  _, batch = _variants(cfg)
  params = _random_params(model, batch)

  def loss(p):
    out = model.apply(p, **batch, train=True, rngs={"dropout": jax.random.key(3)})
    return jnp.mean(out**2), out

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  if lower_only:
    return step.lower(params).as_text()
  (_, out), g = step(params)
  return out, g


@pytest.mark.parametrize(
    "stage, policy",
    [
        ("sr1024", "nothing"),
        ("sr1024", "conv_outputs"),
        pytest.param("base64", "nothing", marks=pytest.mark.slow),
        pytest.param("sr256", "nothing", marks=pytest.mark.slow),
    ],
)
def test_remat_matches_no_remat(stage, policy):
  out0, g0 = _loss_and_grad(stage, remat=False)
  out1, g1 = _loss_and_grad(stage, remat=True, policy=policy)
  np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-5)
  # Same param tree (remat must not rename anything), same gradients.
  assert jax.tree.structure(g0) == jax.tree.structure(g1)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage", ["base64", "sr1024"])
def test_remat_policy_keeps_the_conv_outputs(stage):
  # The lowered step (before XLA's passes): remat's backward recomputes each block's forward
  # convs; keeping their outputs recomputes none of them, so it has the no-remat count.
  convs = {
      (remat, policy): _loss_and_grad(stage, remat, policy, lower_only=True).count(
          "stablehlo.convolution"
      )
      for remat, policy in [(False, "nothing"), (True, "nothing"), (True, "conv_outputs")]
  }
  assert convs[(True, "conv_outputs")] == convs[(False, "nothing")] < convs[(True, "nothing")]


def test_unknown_remat_policy_is_one_clear_error():
  cfg = presets.get_model_config("base64", "tiny")
  cfg.remat_policy = "everything"
  with pytest.raises(ValueError, match=r"model.remat_policy='everything'; allowed: nothing, conv"):
    unet.build_model(cfg)


@pytest.mark.parametrize("stage", STAGES)
def test_bfloat16_compute_keeps_float32_params(stage):
  cfg = presets.get_model_config(stage, "tiny")
  cfg.dtype = "bfloat16"
  model = unet.build_model(cfg)
  _, batch = _variants(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **batch))
  dtypes = {jnp.dtype(x.dtype) for x in jax.tree.leaves(shapes)}
  assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
  out = jax.eval_shape(lambda p: model.apply(p, **batch), shapes)
  assert out.dtype == jnp.float32  # the prediction goes to float32 diffusion math


@pytest.mark.slow
def test_bfloat16_forward_is_finite_and_close():
  cfg = presets.get_model_config("sr256", "tiny")
  _, batch = _variants(cfg)
  outs = []
  for dtype in ("float32", "bfloat16"):
    cfg.dtype = dtype
    model = unet.build_model(cfg)
    params = _random_params(model, batch)
    outs.append(np.asarray(jax.jit(lambda p, model=model: model.apply(p, **batch))(params)))
  assert np.isfinite(outs[1]).all()
  scale = np.abs(outs[0]).max()
  assert np.abs(outs[1] - outs[0]).max() < 0.1 * scale


def test_unknown_kind_is_a_clear_error():
  cfg = presets.get_model_config("base64", "tiny")
  cfg.kind = "transformer"
  with pytest.raises(ValueError, match="unknown model kind 'transformer'"):
    unet.build_model(cfg)


@pytest.mark.slow
def test_init_compiles_and_is_finite():
  cfg = presets.get_model_config("sr1024", "tiny")
  model = unet.build_model(cfg)
  _, batch = _variants(cfg)
  params = jax.jit(model.init)(jax.random.key(0), **batch)
  out = jax.jit(lambda p: model.apply(p, **batch))(params)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_sharded_init_and_apply_with_activation_constraints(stage):
  """Params sharded over a (data=2, fsdp=4) mesh; activations constrained by local rules."""
  from jax.sharding import AxisType

  from imagen_jax.parallel import sharding

  rules = [
      ("activation_batch", "data"),
      ("embed", "fsdp"),
      ("conv_out", "fsdp"),
      ("text_embed", "fsdp"),
  ]
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  cfg = presets.get_model_config(stage, "tiny")
  model = unet.build_model(cfg)
  _, batch = _variants(cfg)
  batch = jax.tree.map(lambda x: jnp.concatenate([x, x[:2]], axis=0), batch)  # B = 8
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), **batch))
  shardings = sharding.to_named(sharding.mesh_specs(abstract, mesh, rules), mesh)
  with jax.set_mesh(mesh):
    params = jax.jit(
        lambda: nn.meta.unbox(model.init(jax.random.key(0), **batch)), out_shardings=shardings
    )()
    with nn.logical_axis_rules(rules):
      out = jax.jit(lambda p: model.apply(p, **batch))(params)
  assert out.shape == batch["x_t"].shape and np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("stage", ("base64", "sr256"))
def test_text_positions_make_the_text_pathway_order_aware(stage):
  """Without positions the text is a set (pooling and cross-attention are permutation
  invariant), so reordering the real tokens changes nothing; with `text_positions` it does,
  while masked tokens still have exactly no effect and no parameters are added."""
  outs, param_counts = {}, {}
  for positions in (False, True):
    cfg = presets.get_model_config(stage, "tiny")
    cfg.text_positions = positions
    model = unet.build_model(cfg)
    _, batch = _variants(cfg)
    text, mask = batch["text_emb"][:1], batch["text_mask"][:1]
    order = jnp.array([2, 0, 1, 3, 4])  # the 3 real tokens rotated; the 2 masked ones kept
    junk = text.at[:, 3:].set(50.0)  # other values at the masked positions
    batch = {k: jnp.concatenate([v[:1]] * 3) for k, v in batch.items()}
    batch["text_emb"] = jnp.concatenate([text, text[:, order], junk])
    batch["text_mask"] = jnp.concatenate([mask, mask[:, order], mask])
    params = _random_params(model, batch)
    param_counts[positions] = sum(p.size for p in jax.tree.leaves(params))
    outs[positions] = np.asarray(
        jax.jit(lambda p, b, model=model: model.apply(p, **b))(params, batch)
    )
  for positions, o in outs.items():
    np.testing.assert_allclose(o[2], o[0], atol=1e-5, rtol=0, err_msg=f"{positions=}")
  np.testing.assert_allclose(outs[False][1], outs[False][0], atol=1e-5, rtol=0)
  assert np.abs(outs[True][1] - outs[True][0]).max() > 1e-3, "token order has no effect"
  assert param_counts[True] == param_counts[False]


def test_text_positions_default_off_except_for_the_shapes_demo():
  for stage in STAGES:
    assert not presets.get_model_config(stage, "paper").text_positions
    assert presets.get_model_config(stage, "shapes").text_positions
