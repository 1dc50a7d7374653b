"""The pure train step on a toy network with the real network's call signature (fast compiles):
EMA, randomness from fold_in(step), text dropping, SR conditioning, non-finite handling, and
sharded (8 devices, data=4 x fsdp=2) == unsharded (1 device)."""

import dataclasses
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import sharding as sh
from imagen_jax.stage import Stage
from imagen_jax.train import optim
from imagen_jax.train import settings as settings_lib
from imagen_jax.train import state as state_lib
from imagen_jax.train import step as step_lib

VOCAB, TEXT_DIM, TEXT_LEN, SIZE, B = 32, 8, 6, 8, 8


def load_config(stage, variant="tiny"):
  """`configs.<stage>.get_config(variant)` (a fresh, unlocked-by-field copy per call)."""
  return importlib.import_module(f"configs.{stage}").get_config(variant)


def toy_stage(config, model=None, text_len=TEXT_LEN, text_dim=TEXT_DIM, size=SIZE):
  """The stage layer of `config` around `model` (ToyNet unless given) at toy sizes."""
  stage = Stage.from_config(config, model=model or ToyNet())
  return dataclasses.replace(
      stage,
      text_len=text_len,
      text_dim=text_dim,
      train_image_size=size,
      train_lowres_size=size // 2 if stage.is_sr else 0,
  )


def _init(names):
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


class ToyNet(nn.Module):
  """Same call signature and logical axis names as nn.unet's networks, ~3k params."""

  @nn.compact
  def __call__(self, x_t, logsnr, text_emb, text_mask, lowres=None, aug_level=None, train=False):
    del train
    m = text_mask.astype(jnp.float32)[..., None]
    pooled = jnp.sum(text_emb * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    cond = nn.Dense(16, kernel_init=_init(("text_embed", "embed")), name="text")(pooled)
    cond = cond + nn.Dense(16, kernel_init=_init((None, "embed")), name="time")(
        logsnr[:, None] / 10.0
    )
    x = x_t
    if lowres is not None:
      x = jnp.concatenate([x_t, lowres], axis=-1)
      cond = cond + nn.Dense(16, kernel_init=_init((None, "embed")), name="aug")(aug_level[:, None])
    h = nn.Conv(16, (3, 3), kernel_init=_init((None, None, "conv_in", "conv_out")), name="conv_in")(
        x
    )
    h = nn.swish(h + cond[:, None, None, :])
    return nn.Conv(
        3, (3, 3), kernel_init=_init((None, None, "conv_in", "conv_out")), name="conv_out"
    )(h)


def toy_encode(params, ids, mask):
  return params["table"][ids] * mask[..., None].astype(jnp.float32)


def toy_text_params():
  return {"table": jax.random.normal(jax.random.key(7), (VOCAB, TEXT_DIM))}


def make_batch(stage, seed=0, size=SIZE, text_len=TEXT_LEN, vocab=VOCAB):
  r = np.random.default_rng(seed)
  batch = dict(
      image=r.uniform(-1, 1, (B, size, size, 3)).astype(np.float32),
      text_ids=r.integers(1, vocab, (B, text_len)).astype(np.int32),
      text_mask=np.arange(text_len)[None, :] < r.integers(1, text_len, (B, 1)),
  )
  if stage != "base64":
    batch["lowres"] = r.uniform(-1, 1, (B, size // 2, size // 2, 3)).astype(np.float32)
  return batch


def setup(
    stage="base64",
    mesh_shape=None,
    devices=None,
    model=None,
    encode=toy_encode,
    text_len=TEXT_LEN,
    text_dim=TEXT_DIM,
    size=SIZE,
    **overrides,
):
  """(config, step fn, jitted step, state, mesh, batch sharding) for a net on a mesh
  (ToyNet and the toy text table unless given), set up the way the trainer does."""
  config = load_config(stage)
  for path, value in overrides.items():
    section, field = path.split(".")
    config[section][field] = value
  devices = devices or jax.devices()[:1]
  mesh = mesh_lib.make_mesh(mesh_shape or {"data": -1}, devices=devices)
  rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
  st = toy_stage(config, model, text_len=text_len, text_dim=text_dim, size=size)
  tx, lr = optim.make_optimizer(config.optim, config.train.num_steps)
  _, specs = state_lib.state_specs(st, tx, mesh, rules)
  shardings = sh.to_named(specs, mesh)
  state = state_lib.create_state(st, tx, shardings, jax.random.key(0))
  fn = step_lib.make_train_step(
      stage=st,
      settings=settings_lib.StepSettings.from_config(config),
      tx=tx,
      lr_schedule=lr,
      encode_tokens=encode,
  )
  batch_sh = NamedSharding(mesh, P(sh.batch_axes(rules, mesh)))
  step = step_lib.jit_train_step(
      fn,
      mesh=mesh,
      rules=rules,
      state_shardings=shardings,
      batch_shardings=batch_sh,
      text_shardings=NamedSharding(mesh, P()),
      constrain_activations=bool(config.mesh.constrain_activations),
  )
  return config, fn, step, state, mesh, batch_sh


def run(step, state, batch_sh, stage, n, text_params=None, **batch_kw):
  text_params = text_params or toy_text_params()
  out = []
  for i in range(n):
    batch = jax.device_put(make_batch(stage, seed=i, **batch_kw), batch_sh)
    state, metrics = step(state, batch, jax.random.key(1), text_params)
    out.append(jax.device_get(metrics))
  return state, out


def copy(tree):
  return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def fresh(state):
  """A copy on the same shardings (the jitted step donates its input state)."""
  return jax.tree.map(lambda x: x.copy(), state)


# One compiled setup per stage for the whole module: compiles dominate CPU test time.
_SETUPS = {}


def get_setup(stage):
  if stage not in _SETUPS:
    _SETUPS[stage] = setup(stage)
  return _SETUPS[stage]


@pytest.mark.parametrize("stage", ["base64", "sr256"])
def test_step_trains_and_updates_ema(stage):
  config, _, step, state0, _, batch_sh = get_setup(stage)
  state = fresh(state0)
  p0 = copy(state.params)
  state, ms = run(step, state, batch_sh, stage, 3)
  assert int(state.step) == 3
  assert all(np.isfinite(m["loss"]) and m["finite"] == 1 for m in ms)
  assert ms[0]["lr"] == 0.0 and ms[2]["lr"] > ms[1]["lr"] > 0  # linear warmup from 0
  p3 = copy(state.params)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), p0, p3)
  assert all(jax.tree.leaves(changed["conv_in"])) and all(jax.tree.leaves(changed["text"]))
  # The SR-only aug_level path gets gradient (the net sees the augmentation level).
  if stage == "sr256":
    assert changed["aug"]["kernel"]
  # One more step by hand: ema' = d * ema + (1 - d) * params' (float32).
  d = config.train.ema_decay
  ema = copy(state.ema_params)
  state, _ = run(step, state, batch_sh, stage, 1)
  want = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, copy(state.params))
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      copy(state.ema_params),
      want,
  )


def test_randomness_is_a_function_of_the_step():
  _, _, step, state0, _, batch_sh = get_setup("sr256")
  batch = jax.device_put(make_batch("sr256"), batch_sh)
  text = toy_text_params()
  _, m1 = step(fresh(state0), batch, jax.random.key(3), text)
  _, m2 = step(fresh(state0), batch, jax.random.key(3), text)
  _, m3 = step(fresh(state0).replace(step=state0.step + 1), batch, jax.random.key(3), text)
  assert float(m1["loss"]) == float(m2["loss"])
  assert float(m1["loss"]) != float(m3["loss"])


def test_dropped_text_gets_no_gradient():
  # Dropped text = zero embeddings + all-False mask: with drop_prob = 1 the text projection
  # gets no gradient at all, so Adam leaves it exactly where it was (with the default 0.1 it
  # moves: test_step_trains_and_updates_ema).
  _, _, step, state, _, batch_sh = setup("sr256", **{"text.drop_prob": 1.0})
  k0 = copy(state.params["text"]["kernel"])
  state, ms = run(step, state, batch_sh, "sr256", 3)
  assert all(m["text_kept"] == 0.0 for m in ms)
  np.testing.assert_array_equal(k0, copy(state.params["text"]["kernel"]))


def test_nonfinite_step_is_skipped():
  _, _, step, state0, _, batch_sh = get_setup("base64")
  state, _ = run(step, fresh(state0), batch_sh, "base64", 2)
  before = copy(state)
  bad = make_batch("base64")
  bad["image"][0, 0, 0, 0] = np.nan
  state, m = step(state, jax.device_put(bad, batch_sh), jax.random.key(1), toy_text_params())
  m = jax.device_get(m)
  assert m["finite"] == 0 and not np.isfinite(m["loss"])
  after = copy(state)
  assert int(after.step) == int(before.step) + 1
  for name in ("params", "ema_params", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))


@pytest.mark.parametrize(
    "stage, path, value, match",
    [
        ("base64", "diffusion.target", "w", "diffusion.target 'w'"),
        ("sr256", "diffusion.aug_level", (0.5, 0.2), "aug_level"),
        ("sr256", "diffusion.schedule", "sqrt", "diffusion.schedule 'sqrt'"),
    ],
)
def test_bad_settings_are_clear_errors(stage, path, value, match):
  config = load_config(stage)
  section, field = path.split(".")
  config[section][field] = value
  with pytest.raises(ValueError, match=match):
    toy_stage(config)
    settings_lib.StepSettings.from_config(config)


def test_sharded_equals_unsharded():
  """4 Adam steps on 1 device vs 8 devices (data=4, fsdp=2) give the same params.

  Tolerance: the programs differ only in how XLA splits reductions (batch means, conv
  weight gradients summed over data shards then all-reduced), i.e. float32 summation order,
  ~1e-7 relative per reduction. Adam divides by sqrt(nu), which can amplify tiny gradient
  differences where |g| ~ eps, so we allow 1e-5 (lr is 3e-3, params are O(0.1-1)): far
  below one update, far above float32 rounding.
  """
  stage = "sr256"
  _, _, step1, s1, _, sh1 = get_setup(stage)
  _, _, step8, s8, _, sh8 = setup(stage, {"data": 4, "fsdp": 2, "tensor": 1}, devices=jax.devices())
  assert s8.params["conv_in"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
  assert s8.opt_state[1][0].mu["conv_in"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
  s1, m1 = run(step1, fresh(s1), sh1, stage, 4)
  s8, m8 = run(step8, s8, sh8, stage, 4)
  np.testing.assert_allclose([m["loss"] for m in m1], [m["loss"] for m in m8], rtol=1e-5)
  for name in ("params", "ema_params"):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
        copy(getattr(s1, name)),
        copy(getattr(s8, name)),
    )


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["base64", "sr256"])
def test_sharded_equals_unsharded_tiny_networks(stage):
  """The same check with the real tiny U-Net / Efficient U-Net and the frozen tiny T5 (same
  tolerance and reasoning as test_sharded_equals_unsharded)."""
  from imagen_jax.nn import unet
  from imagen_jax.text import registry

  config = load_config(stage)
  encoder = registry.get_text_encoder(config.text)
  kw = dict(
      model=unet.build_model(config.model),
      encode=encoder.encode_tokens,
      text_len=encoder.max_length,
      text_dim=encoder.dim,
      size=config.image_size,
  )
  batch_kw = dict(size=config.image_size, text_len=encoder.max_length, vocab=200)
  _, _, step1, s1, _, sh1 = setup(stage, **kw)
  _, _, step8, s8, _, sh8 = setup(
      stage, {"data": 4, "fsdp": 2, "tensor": 1}, devices=jax.devices(), **kw
  )
  s1, m1 = run(step1, s1, sh1, stage, 3, encoder.params, **batch_kw)
  s8, m8 = run(step8, s8, sh8, stage, 3, encoder.params, **batch_kw)
  np.testing.assert_allclose([m["loss"] for m in m1], [m["loss"] for m in m8], rtol=1e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
      copy(s1.params),
      copy(s8.params),
  )
