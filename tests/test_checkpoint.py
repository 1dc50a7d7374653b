"""Orbax checkpointer: sharded round trip of {train_state, ema_params, data iterators, config},
the EMA params restored alone, mismatch errors before any load, an older layout refused with what
changed, and interrupted (unfinalized) saves never taken for complete ones."""

import os
import shutil

import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax import checkpoint as ckpt_lib
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


def data_iterator(seed=0):
  """A grain DataLoader iterator over 0..99, shuffled (the trainer's kind of iterator)."""
  loader = grain.DataLoader(
      data_source=grain.RangeDataSource(0, 100, 1),
      sampler=grain.IndexSampler(
          num_records=100, shard_options=grain.NoSharding(), shuffle=True, num_epochs=1, seed=seed
      ),
      worker_count=0,
  )
  return iter(loader)


def save(ck, step, mesh, *, data_iters=(), config=None, width=16):
  train_state, ema = toy_items(mesh, width=width, step=step)
  ck.save(
      step,
      train_state=train_state,
      ema_params=ema,
      data_iters=data_iters,
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
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt", num_data_iters=2)
  its = [data_iterator(0), data_iterator(1)]
  seen = [[next(it) for _ in range(5)] for it in its]
  train_state, ema = save(ck, 3, mesh, data_iters=its)
  # The positions are captured at save time: the iterators may move on.
  after = [[next(it) for _ in range(4)] for it in its]
  assert ck.latest_step() == 3
  assert ck.saved_items(3) == ["config", "data_iter_0", "data_iter_1", "ema_params", "train_state"]
  assert (tmp_path / "ckpt" / "3" / "data_iter_1" / "process_0-of-1.json").exists()
  assert ck.saved_config(3) == CONFIG
  fresh = [data_iterator(0), data_iterator(1)]
  got_state, got_ema = ck.restore(
      3,
      train_state=abstract_of(train_state),
      ema_params=abstract_of(ema),
      data_iters=fresh,
      config_dict=CONFIG,
  )
  for want, got in ((train_state, got_state), (ema, got_ema)):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert a.sharding == b.sharding
  # Each restored iterator goes on exactly where its original was when saved.
  assert [[next(it) for _ in range(4)] for it in fresh] == after
  assert seen[0] != seen[1]
  ck.close()


def test_ema_params_restore_alone(tmp_path, mesh):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt", num_data_iters=1)
  _, ema = save(ck, 3, mesh, data_iters=[data_iterator()])
  ck.close()
  sampler = ckpt_lib.Checkpointer(tmp_path / "ckpt", async_save=False)  # no data iterators
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
      match=r"different model.*model\.base_channels: 16 in checkpoint, now 32",
  ):
    ck.restore(3, train_state=wide_state, ema_params=wide_ema, config_dict=other)
  # Same config but a differently shaped state (e.g. another optimizer / edited code).
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"dense/kernel: \(4, 16\) saved"):
    ck.restore(3, train_state=wide_state, ema_params=wide_ema, config_dict=CONFIG)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"'ema_params'.*dense/kernel"):
    ck.restore_ema(3, wide_ema, config_dict=CONFIG)
  ck.close()


def test_another_number_of_data_iterators_is_refused(tmp_path, mesh):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt", num_data_iters=2)
  train_state, ema = save(ck, 3, mesh, data_iters=[data_iterator(0), data_iterator(1)])
  ck.close()
  ck1 = ckpt_lib.Checkpointer(tmp_path / "ckpt", num_data_iters=1)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"data_shards or the process count"):
    ck1.restore(
        3,
        train_state=abstract_of(train_state),
        ema_params=abstract_of(ema),
        data_iters=[data_iterator(0)],
    )
  ck1.close()


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
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt", num_data_iters=1)
  assert ck.latest_step() == 5
  message = (
      r"written by an older layout: items \['config', 'data_iter', 'state'\] found, "
      r"\['train_state', 'ema_params', 'config', 'data_iter_0'\] expected.*"
      r"EMA params are now their own item.*Retrain"
  )
  with pytest.raises(ckpt_lib.CheckpointLayoutError, match=message):
    ck.restore(
        5,
        train_state=abstract_of(train_state),
        ema_params=abstract_of(ema),
        data_iters=[data_iterator()],
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
  ck2 = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  assert ck2.latest_step() == 3 and ck2.all_steps() == [3]
  restored, _ = ck2.restore(
      3, train_state=abstract_of(train_state), ema_params=abstract_of(ema), config_dict=CONFIG
  )
  assert int(restored["step"]) == 3
  ck2.close()


def test_async_save_returns_before_the_write_and_wait_finalizes(tmp_path, mesh):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  save(ck, 5, mesh, width=256)
  assert ck.latest_step() == 5
  assert (tmp_path / "ckpt" / "5").is_dir()
  assert not any(".orbax-checkpoint-tmp" in p.name for p in (tmp_path / "ckpt").iterdir())
  ck.close()
