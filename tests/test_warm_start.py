"""Warm start (`train.init_from`, `train.freeze`; imagen_jax/train/warm_start.py): a new run's
first loss is the source's EMA params' loss on the same batch; the source and its fingerprint
are recorded and a resume under another source is refused; params that do not fit are refused
by name; other formats plug in through FOREIGN_LOADERS; frozen params get no update."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imagen_jax import checkpoint as ckpt_lib
from imagen_jax import run_meaning
from imagen_jax.data import pipeline
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import sharding as sharding_lib
from imagen_jax.sampling import cascade
from imagen_jax.stage import Stage
from imagen_jax.text import registry
from imagen_jax.train import optim, settings, trainer, warm_start
from imagen_jax.train import program as program_lib
from imagen_jax.train import state as state_lib
from tests.test_train_trainer import CUT, tiny_config

BASE = {"train.log_every": 1, "train.ckpt_every": 100, "train.sample_every": 0, **CUT}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(source workdir trained 3 steps, warm-started workdir trained 1 step, its config)."""
  root = tmp_path_factory.mktemp("warm")
  data = root / "data"
  source = str(root / "source")
  trainer.train_and_evaluate(
      tiny_config("base64", data, **{**BASE, "train.num_steps": 3, "train.ema_decay": 0.5}),
      source,
  )
  config = tiny_config(
      "base64",
      data,
      # The source's optimizer and EMA settings: the same step program, loaded from the run's
      # compilation cache instead of compiled again (the first loss is taken before any update).
      **{**BASE, "train.num_steps": 1, "train.init_from": source, "train.ema_decay": 0.5},
  )
  target = str(root / "target")
  trainer.train_and_evaluate(config, target)
  return source, target, config


def test_first_loss_is_the_source_loss_on_the_same_batch(runs):
  source, target, c = runs
  with open(os.path.join(target, "metrics.jsonl")) as f:
    first = json.loads(f.readline())
  assert first["step"] == 1
  # The source's EMA params through the sampler's own loader, in the new run's program, on the
  # new run's first batch and step key.
  mesh = mesh_lib.make_mesh(dict(c.mesh.shape))
  rules = tuple(tuple(r) for r in c.mesh.logical_axis_rules)
  encoder = registry.get_text_encoder(c.text, mesh=mesh, rules=rules, progress=False)
  program = program_lib.build(c, mesh, encoder, use_cache=False)
  loaded = cascade.load_stage(source, mesh=mesh, rules=rules)
  state = state_lib.create_state(program.stage, program.tx, program.shardings, jax.random.key(9))
  state = state.replace(params=jax.device_put(loaded.params, program.shardings.params))
  loader = trainer.make_train_loader(settings.LoaderSettings.from_config(c), encoder.tokenize, 0)
  batch = pipeline.to_global_batch(next(loader), mesh, sharding_lib.batch_axes(rules, mesh))
  step_rng = jax.random.split(jax.random.key(int(c.train.seed)), 3)[1]
  _, metrics = program.step(state, batch, step_rng, encoder.params)
  np.testing.assert_allclose(first["loss"], float(metrics["loss"]), rtol=1e-6)
  # And the source's params differ from a fresh init: the check is not vacuous.
  fresh = state_lib.create_state(program.stage, program.tx, program.shardings, jax.random.key(9))
  _, fresh_metrics = program.step(fresh, batch, step_rng, encoder.params)
  assert abs(float(fresh_metrics["loss"]) - first["loss"]) > 1e-4


def test_source_and_fingerprint_are_recorded_and_part_of_the_meaning(runs):
  source, target, c = runs
  with open(os.path.join(target, "config.json")) as f:
    saved = json.load(f)
  src_ckpt = ckpt_lib.Checkpointer(os.path.join(source, "checkpoints"), read_only=True)
  assert saved["train"]["init_from"] == source
  assert saved["train"]["init_step"] == src_ckpt.latest_step() == 3
  loaded = cascade.load_stage(source)
  assert saved["train"]["init_fingerprint"] == warm_start.fingerprint(loaded.params)
  ckpt = ckpt_lib.Checkpointer(os.path.join(target, "checkpoints"), read_only=True)
  assert ckpt.saved_config(1)["train"]["init_fingerprint"] == saved["train"]["init_fingerprint"]
  other = {**saved, "train": {**saved["train"], "init_from": "/elsewhere"}}
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="train.init_from"):
    ckpt_lib.check_resume_meaning(os.path.join(target, "checkpoints"), other)
  # A run without a warm start (and one written before the field existed) compares equal.
  plain = {**saved, "train": {k: v for k, v in saved["train"].items() if k != "init_from"}}
  assert not run_meaning.meaning_diff(
      plain, {**plain, "train": {**plain["train"], "init_from": ""}}
  )


def test_params_that_do_not_fit_are_refused_by_name(runs, tmp_path):
  source, _, c = runs
  wider = tiny_config("base64", tmp_path, **{**CUT, "model.base_channels": 24})
  abstract = Stage.from_config(wider).abstract_params()
  with pytest.raises(warm_start.WarmStartError, match=r"shape mismatches .*kernel: \(") as e:
    warm_start.load(source, abstract)
  assert source in str(e.value)


def test_foreign_loader_hook_and_unknown_folder(tmp_path, monkeypatch):
  abstract = {"dense": {"kernel": jax.ShapeDtypeStruct((2, 3), jnp.float32)}}
  with pytest.raises(warm_start.WarmStartError, match="not a workdir of this project"):
    warm_start.load(str(tmp_path), abstract)
  ones = {"dense": {"kernel": jnp.ones((2, 3))}}
  monkeypatch.setattr(
      warm_start, "FOREIGN_LOADERS", [lambda path, a: ones if path == str(tmp_path) else None]
  )
  params, record = warm_start.load(str(tmp_path), abstract)
  np.testing.assert_array_equal(params["dense"]["kernel"], np.ones((2, 3)))
  assert record["init_from"] == str(tmp_path) and len(record["init_fingerprint"]) == 16
  wrong = {"dense": {"kernel": jax.ShapeDtypeStruct((3, 3), jnp.float32)}}
  with pytest.raises(warm_start.WarmStartError, match=r"dense/kernel: \(2, 3\) in the source"):
    warm_start.load(str(tmp_path), wrong)


def test_frozen_params_get_no_update_and_no_state():
  from ml_collections import ConfigDict

  c = ConfigDict(
      dict(
          name="adam", learning_rate=0.1, warmup_steps=0, decay="constant", end_learning_rate=0.0,
          b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0,
      )
  )  # fmt: skip
  params = {"text_proj": {"kernel": jnp.ones((2, 2))}, "conv": {"kernel": jnp.ones((3,))}}
  tx, _ = optim.make_optimizer(c, 10, freeze="^(?!text_proj)")
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["conv"]["kernel"], params["conv"]["kernel"])
  assert np.all(np.asarray(new["text_proj"]["kernel"]) < 1.0)
  with pytest.raises(ValueError, match=r"train.freeze='\(' is not a regular expression"):
    optim.make_optimizer(c, 10, freeze="(")


def test_fingerprint_ignores_layout_and_sees_one_bit():
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  x = jax.random.normal(jax.random.key(0), (64, 8))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))
  assert warm_start.fingerprint({"w": x}) == warm_start.fingerprint({"w": sharded})
  flipped = x.at[3, 5].set(jnp.nextafter(x[3, 5], jnp.inf))
  assert warm_start.fingerprint({"w": flipped}) != warm_start.fingerprint({"w": x})
  swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
  assert warm_start.fingerprint({"w": swapped}) != warm_start.fingerprint({"w": x})
