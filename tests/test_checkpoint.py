"""Orbax checkpointer: sharded round trip of {train_state, ema_params, data position, config},
the EMA params restored alone, mismatch errors (model, diffusion, text encoder) before any load,
an older layout refused with what changed, interrupted (unfinalized) saves never taken for
complete ones and their temporary directories cleaned, a corrupt latest step falling back to the
previous one, a full disk keeping the last complete step, and keep-period retention."""

import errno
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax import checkpoint as ckpt_lib
from imagen_jax import run_meaning
from imagen_jax.parallel import mesh as mesh_lib


def toy_items(mesh, width=16, step=3):
  """(train_state {step, params, opt_state}, ema_params) of a one-layer toy model."""
  fsdp = NamedSharding(mesh, P(None, "fsdp"))
  rep = NamedSharding(mesh, P())
  w = jnp.arange(4 * width, dtype=jnp.float32).reshape(4, width)
  params = {
      "dense": {"kernel": jax.device_put(w, fsdp), "bias": jax.device_put(jnp.ones((width,)), rep)}
  }
  train_state = {
      "step": jax.device_put(jnp.asarray(step, jnp.int32), rep),
      "params": params,
      "opt_state": {
          "mu": jax.tree.map(jnp.zeros_like, params),
          "count": jax.device_put(jnp.asarray(step), rep),
      },
  }
  return train_state, jax.tree.map(lambda x: x * 0.5, params)


def abstract_of(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def position(next_example):
  """A global data position as the trainer saves it."""
  return {
      "next_example": next_example,
      "global_batch_size": 8,
      "num_records": 100,
      "seed": 0,
      "shuffle": True,
  }


def save(ck, step, mesh, *, data_position=None, config=None, width=16):
  train_state, ema = toy_items(mesh, width=width, step=step)
  ck.save(
      step,
      train_state=train_state,
      ema_params=ema,
      data_position=data_position,
      config_dict=config or CONFIG,
  )
  ck.wait()
  return train_state, ema


CONFIG = {
    "stage": "base64",
    "model": {"base_channels": 16, "channel_mult": [1, 2]},
    "train": {"num_steps": 10},
}


@pytest.fixture
def mesh():
  return mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})


def test_round_trip_keeps_values_shardings_and_data_positions(tmp_path, mesh):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  train_state, ema = save(ck, 3, mesh, data_position=position(24))
  assert ck.latest_step() == 3
  assert ck.saved_items(3) == ["config", "data_position", "ema_params", "train_state"]
  assert ck.saved_config(3) == CONFIG
  got_state, got_ema = ck.restore(
      3,
      train_state=abstract_of(train_state),
      ema_params=abstract_of(ema),
      config_dict=CONFIG,
  )
  for want, got in ((train_state, got_state), (ema, got_ema)):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert a.sharding == b.sharding
  # One global position, the same for any process count.
  assert ck.data_position(3) == position(24)
  ck.close()


def test_ema_params_restore_alone(tmp_path, mesh):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  _, ema = save(ck, 3, mesh, data_position=position(24))
  ck.close()
  sampler = ckpt_lib.Checkpointer(tmp_path / "ckpt", async_save=False)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), ema)
  got = sampler.restore_ema(3, target, config_dict=CONFIG)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ema, got)
  assert all(x.sharding == one for x in jax.tree.leaves(got))
  sampler.close()


def test_restore_into_another_model_fails_before_loading(tmp_path, mesh):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  save(ck, 3, mesh)
  other = {**CONFIG, "model": {"base_channels": 32, "channel_mult": [1, 2]}}
  wide_state, wide_ema = (abstract_of(t) for t in toy_items(mesh, width=32))
  with pytest.raises(
      ckpt_lib.CheckpointMismatchError,
      match=r"different run.*model\.base_channels: 16 in checkpoint, now 32",
  ):
    ck.restore(3, train_state=wide_state, ema_params=wide_ema, config_dict=other)
  # Same config but a differently shaped state (e.g. another optimizer / edited code).
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"dense/kernel: \(4, 16\) saved"):
    ck.restore(3, train_state=wide_state, ema_params=wide_ema, config_dict=CONFIG)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"'ema_params'.*dense/kernel"):
    ck.restore_ema(3, wide_ema, config_dict=CONFIG)
  ck.close()


def test_model_fields_added_later_compare_at_their_old_behaviour(tmp_path, mesh):
  """A checkpoint from before `model.text_positions` existed (trained without positions)
  resumes under text_positions=False and is refused under True."""
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  train_state, ema = save(ck, 3, mesh)  # CONFIG has no text_positions
  model = CONFIG["model"]
  target = dict(train_state=abstract_of(train_state), ema_params=abstract_of(ema))
  ck.restore(3, **target, config_dict={**CONFIG, "model": {**model, "text_positions": False}})
  with pytest.raises(
      ckpt_lib.CheckpointMismatchError,
      match=r"model\.text_positions: False in checkpoint, now True",
  ):
    ck.restore(3, **target, config_dict={**CONFIG, "model": {**model, "text_positions": True}})
  ck.close()


def test_old_layout_is_refused_naming_what_changed(tmp_path, mesh):
  """A checkpoint of the older layout (items state = the whole train state with the EMA
  params inside, data_iter, config) fails for resuming and for sampling, saying why."""
  train_state, ema = toy_items(mesh)
  old_state = {**train_state, "ema_params": ema}
  mngr = ocp.CheckpointManager(
      tmp_path / "ckpt",
      options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
      item_handlers={
          "state": ocp.StandardCheckpointHandler(),
          "data_iter": ocp.JsonCheckpointHandler(),
          "config": ocp.JsonCheckpointHandler(),
      },
  )
  mngr.save(
      5,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(old_state),
          data_iter=ocp.args.JsonSave({"shards": []}),
          config=ocp.args.JsonSave(CONFIG),
      ),
  )
  mngr.wait_until_finished()
  mngr.close()
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  assert ck.latest_step() == 5
  message = (
      r"written by an older layout: items \['config', 'data_iter', 'state'\] found, "
      r"\['train_state', 'ema_params', 'config'\] expected.*"
      r"EMA params are now their own item.*Retrain"
  )
  with pytest.raises(ckpt_lib.CheckpointLayoutError, match=message):
    ck.restore(
        5,
        train_state=abstract_of(train_state),
        ema_params=abstract_of(ema),
        config_dict=CONFIG,
    )
  with pytest.raises(ckpt_lib.CheckpointLayoutError, match="EMA params are now their own item"):
    ck.restore_ema(5, abstract_of(ema), config_dict=CONFIG)
  ck.close()


def test_unfinalized_save_is_not_a_checkpoint(tmp_path, mesh):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  train_state, ema = save(ck, 3, mesh)
  ck.close()
  # A save killed mid-write leaves Orbax's temporary directory (renamed to "<step>" only at
  # finalize) - here with every file of a real step, just never finalized.
  shutil.copytree(tmp_path / "ckpt" / "3", tmp_path / "ckpt" / "7.orbax-checkpoint-tmp")
  os.makedirs(tmp_path / "ckpt" / "9.orbax-checkpoint-tmp-1234")
  reader = ckpt_lib.Checkpointer(tmp_path / "ckpt", read_only=True)
  assert reader.latest_step() == 3 and reader.all_steps() == [3]
  reader.close()
  # A sampler (read-only) never removes them: they may be a running trainer's save in flight.
  assert (tmp_path / "ckpt" / "7.orbax-checkpoint-tmp").exists()
  ck2 = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  assert ck2.latest_step() == 3 and ck2.all_steps() == [3]
  restored, _ = ck2.restore(
      3, train_state=abstract_of(train_state), ema_params=abstract_of(ema), config_dict=CONFIG
  )
  assert int(restored["step"]) == 3
  ck2.close()
  # A writer cleans Orbax's leftover temporary directories when it starts.
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["3"]


def test_async_save_returns_before_the_write_and_wait_finalizes(tmp_path, mesh):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  save(ck, 5, mesh, width=256)
  assert ck.latest_step() == 5
  assert (tmp_path / "ckpt" / "5").is_dir()
  assert not any(".orbax-checkpoint-tmp" in p.name for p in (tmp_path / "ckpt").iterdir())
  ck.close()


RUN = {
    **CONFIG,
    "image_size": 16,
    "lowres_size": 0,
    "diffusion": {"schedule": "cosine", "target": "eps", "aug_level": [0.0, 0.0]},
    "text": {"name": "byt5-tiny-random", "max_length": 64, "path": None, "fingerprint": "a" * 16},
    "optim": {"learning_rate": 1e-4},
}


def _with(config, **changes):
  """`config` with dotted fields changed: _with(RUN, **{"diffusion.target": "v"})."""
  out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
  for path, value in changes.items():
    section, field = path.split(".")
    out[section][field] = value
  return out


def test_resume_refuses_changed_schedule_target_max_length_and_fingerprint(tmp_path, mesh):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  train_state, ema = save(ck, 3, mesh, config=RUN)
  target = dict(train_state=abstract_of(train_state), ema_params=abstract_of(ema))
  other = _with(
      RUN,
      **{
          "diffusion.target": "v",
          "diffusion.schedule": "linear_beta",
          "text.max_length": 32,
          "text.fingerprint": "b" * 16,
      },
  )
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ck.restore(3, **target, config_dict=other)
  message = str(e.value)
  for field, old, new in [
      ("diffusion.schedule", "'cosine'", "'linear_beta'"),
      ("diffusion.target", "'eps'", "'v'"),
      ("text.max_length", "64", "32"),
      ("text.fingerprint", repr("a" * 16), repr("b" * 16)),
  ]:
    assert f"{field}: {old} in checkpoint, now {new}" in message, message
  assert "4 difference(s)" in message
  assert "--config.diffusion.target=eps" in message and "fresh workdir" in message
  # The sampler's EMA-only restore checks the same fields.
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"diffusion\.target: 'eps'"):
    ck.restore_ema(3, abstract_of(ema), config_dict=other)
  # Each meaning field alone is refused too: aug range, sizes, the encoder's name.
  for change in [
      {"diffusion.aug_level": [0.0, 0.5]},
      {"text.name": "t5-small"},
      {"model.base_channels": 8},
  ]:
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=next(iter(change))):
      ck.restore(3, **target, config_dict=_with(RUN, **change))
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"image_size: 16 in checkpoint"):
    ck.restore(3, **target, config_dict={**RUN, "image_size": 32})
  ck.close()


def test_resume_allows_settings_that_keep_the_meaning(tmp_path, mesh):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  train_state, ema = save(ck, 3, mesh, config=RUN)
  allowed = _with(
      RUN,
      **{"train.num_steps": 500, "optim.learning_rate": 3e-5, "text.path": "/moved/weights"},
  )
  got, _ = ck.restore(
      3, train_state=abstract_of(train_state), ema_params=abstract_of(ema), config_dict=allowed
  )
  assert int(got["step"]) == 3
  # Training settings are not the meaning; a warm start's source is (train.warm_start).
  fields = set(run_meaning.MEANING_FIELDS) - {"train.init_from"}
  assert {"train", "optim"}.isdisjoint(f.split(".")[0] for f in fields)
  ck.close()


def test_meaning_diff_compares_the_fingerprint_only_when_asked_and_both_have_one():
  a = run_meaning.with_text_fingerprint({"stage": "base64"}, "aaa")
  b = run_meaning.with_text_fingerprint({"stage": "base64"}, "bbb")
  assert run_meaning.meaning_diff(a, b) == [(run_meaning.TEXT_FINGERPRINT, "aaa", "bbb")]
  assert run_meaning.meaning_diff(a, b, fingerprint=False) == []
  assert run_meaning.meaning_diff(a, {"stage": "base64"}) == []  # one side has none
  assert run_meaning.meaning_diff(a, {**b, "stage": "sr256"}, fingerprint=False) == [
      ("stage", "base64", "sr256")
  ]


def _truncate_arrays(step_dir, item):
  files = [p for p in (step_dir / item).rglob("*") if p.is_file() and "/d/" in str(p)]
  assert files
  for p in files:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def test_corrupt_latest_checkpoint_fallback(tmp_path, mesh, caplog):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  train_state, ema = save(ck, 3, mesh, data_position=position(24))
  save(ck, 6, mesh, data_position=position(48))
  ck.close()
  _truncate_arrays(tmp_path / "ckpt" / "6", "ema_params")
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  with caplog.at_level(logging.WARNING):
    step, got, _ = ck.restore_latest(
        train_state=abstract_of(train_state),
        ema_params=abstract_of(ema),
        config_dict=CONFIG,
    )
  assert step == 3 and int(got["step"]) == 3
  assert ck.data_position(step) == position(24)  # the data position of step 3 too
  assert "STEP 6" in caplog.text and "RESUMED FROM STEP 3, NOT FROM THE LATEST" in caplog.text
  # The bad step is kept aside for inspection and is no longer a step.
  assert ck.all_steps() == [3] and (tmp_path / "ckpt" / "6.corrupt").is_dir()
  ck.close()


def test_corrupt_only_checkpoint_fallback_fails_clearly(tmp_path, mesh):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  train_state, ema = save(ck, 3, mesh)
  ck.close()
  _truncate_arrays(tmp_path / "ckpt" / "3", "train_state")
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  with pytest.raises(ckpt_lib.CheckpointCorruptError, match=r"no step of .* restores: step 3"):
    ck.restore_latest(
        train_state=abstract_of(train_state), ema_params=abstract_of(ema), config_dict=CONFIG
    )
  assert ck.all_steps() == [3]  # nothing moved when nothing restores
  ck.close()


def test_disk_full_save_keeps_the_last_complete_checkpoint(tmp_path, mesh, monkeypatch):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  train_state, ema = save(ck, 3, mesh)

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", full_disk)
  with pytest.raises(
      ckpt_lib.CheckpointSaveError, match=r"step 6 .*disk is full.*step 3\) is kept"
  ):
    save(ck, 6, mesh)
  ck.close()  # the failure was reported once: closing does not raise it again
  monkeypatch.undo()
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  assert ck.all_steps() == [3]
  got, _ = ck.restore(
      3, train_state=abstract_of(train_state), ema_params=abstract_of(ema), config_dict=CONFIG
  )
  assert int(got["step"]) == 3
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["3"]
  ck.close()


def test_keep_period_keeps_the_period_steps(tmp_path, mesh):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt", max_to_keep=1, keep_period=4, async_save=False)
  for step in (2, 4, 6, 8, 10):
    save(ck, step, mesh)
  assert ck.all_steps() == [4, 8, 10]
  ck.close()
  with pytest.raises(ValueError, match=r"keep_period=-1"):
    ckpt_lib.Checkpointer(tmp_path / "other", keep_period=-1)
