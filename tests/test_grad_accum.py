"""Gradient accumulation (`train.grad_accum_steps = k`): k microbatches of B / k give the update
of the one batch of B (params, EMA, optimizer state, loss), sharded on 8 devices; the trainer
counts optimizer steps (data position, checkpoints, metric rows); bad values are refused naming
what is allowed.

Tolerance 1e-5, as in tests/test_train_step.py's sharded == unsharded: the programs differ only
in float32 summation order (k partial means summed, then / k); Adam divides by sqrt(nu), which
can amplify a tiny gradient difference where |g| ~ eps; far below one update (lr 3e-3).
"""

import json
import os

import jax
import numpy as np
import pytest

from imagen_jax import checkpoint as ckpt_lib
from imagen_jax.train import program as program_lib
from imagen_jax.train import settings
from imagen_jax.train import step as step_lib
from tests import test_train_step
from tests.test_train_step import copy, load_config, run, setup

MESH = {"data": 2, "fsdp": 2, "tensor": 2}  # 4 batch shards
# 16 examples: 2 per batch shard in each of k = 2 microbatches. (At one example per shard the
# SR toy step on this mesh already differs from one device without accumulation.)
BATCH = 16


def assert_same_run(a, b):
  (s1, m1), (s2, m2) = a, b
  np.testing.assert_allclose([m["loss"] for m in m1], [m["loss"] for m in m2], rtol=1e-5)
  np.testing.assert_allclose([m["grad_norm"] for m in m1], [m["grad_norm"] for m in m2], rtol=1e-5)
  for name in ("params", "ema_params", "opt_state"):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5),
        copy(getattr(s1, name)),
        copy(getattr(s2, name)),
    )
  assert int(s1.step) == int(s2.step) == len(m1)


def test_microbatches_are_strided_and_cover_the_batch():
  x = np.arange(8 * 3).reshape(8, 3)
  mbs = [np.asarray(step_lib.microbatch(x, j, 2)) for j in range(2)]
  assert mbs[0].shape == (4, 3)
  np.testing.assert_array_equal(mbs[0][:, 0], [0, 6, 12, 18])  # examples 0, 2, 4, 6
  np.testing.assert_array_equal(mbs[1][:, 0], [3, 9, 15, 21])  # examples 1, 3, 5, 7
  assert sorted(np.concatenate(mbs)[:, 0].tolist()) == x[:, 0].tolist()


@pytest.mark.parametrize("stage", ["base64", "sr256"])
def test_accumulated_equals_big_batch_toy_sharded(stage, monkeypatch):
  monkeypatch.setattr(test_train_step, "B", BATCH)
  devices = jax.devices()
  runs = []
  for k in (1, 2):
    _, _, step, state, _, sh = setup(stage, MESH, devices=devices, **{"train.grad_accum_steps": k})
    runs.append(run(step, state, sh, stage, 3))
  assert_same_run(*runs)


@pytest.mark.slow
def test_accumulated_equals_big_batch_tiny_unet_sharded(monkeypatch):
  """The real tiny base U-Net and frozen tiny T5 (encoded per microbatch inside the scan)."""
  monkeypatch.setattr(test_train_step, "B", BATCH)
  from imagen_jax.nn import unet
  from imagen_jax.text import registry

  config = load_config("base64")
  encoder = registry.get_text_encoder(config.text)
  kw = dict(
      model=unet.build_model(config.model),
      encode=encoder.encode_tokens,
      text_len=encoder.max_length,
      text_dim=encoder.dim,
      size=config.image_size,
  )
  batch_kw = dict(size=config.image_size, text_len=encoder.max_length, vocab=200)
  runs = []
  for k in (1, 2):
    _, _, step, state, _, sh = setup(
        "base64", MESH, devices=jax.devices(), **{"train.grad_accum_steps": k}, **kw
    )
    runs.append(run(step, state, sh, "base64", 2, encoder.params, **batch_kw))
  assert_same_run(*runs)


@pytest.mark.parametrize(
    "value, match",
    [
        (3, r"grad_accum_steps=3 does not divide train.global_batch_size=8; allowed: 1, 2, 4, 8"),
        (0, r"grad_accum_steps=0; allowed: an int >= 1"),
        (True, r"grad_accum_steps=True; allowed: an int >= 1"),
    ],
)
def test_bad_accumulation_is_refused(value, match):
  config = load_config("base64")
  config.train.global_batch_size = 8
  config.train.grad_accum_steps = value
  with pytest.raises(ValueError, match=match):
    settings.check(config)


def test_microbatch_must_divide_over_the_batch_shards():
  from imagen_jax.parallel import mesh as mesh_lib

  config = load_config("base64")
  config.train.global_batch_size = 8
  config.train.grad_accum_steps = 4  # microbatches of 2 over 4 batch shards
  mesh = mesh_lib.make_mesh(MESH, devices=jax.devices())
  rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
  with pytest.raises(
      ValueError, match=r"in train.grad_accum_steps=4 microbatches .* multiple of 16"
  ):
    program_lib.check_batch(config, rules, mesh)


def test_trainer_counts_optimizer_steps(tmp_path):
  """2 optimizer steps of 16 examples in 2 microbatches: the checkpoint is step 2, its data
  position 32 examples, one metric row per logged optimizer step."""
  from imagen_jax.train import trainer
  from tests.test_train_trainer import CUT, tiny_config

  workdir = str(tmp_path / "run")
  config = tiny_config(
      "base64",
      tmp_path / "data",
      **{
          "train.num_steps": 2,
          "train.global_batch_size": 16,
          "train.grad_accum_steps": 2,
          "train.log_every": 1,
          "train.ckpt_every": 100,
          **CUT,
      },
  )
  out = trainer.train_and_evaluate(config, workdir)
  assert out["step"] == 2
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  assert ckpt.latest_step() == 2
  assert ckpt.data_position(2)["next_example"] == 32
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2]
  assert all(r["images_per_sec"] > 0 for r in rows)
