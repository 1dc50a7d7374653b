"""Orbax checkpointer: sharded round trip with data state + config, mismatch errors before any
load, and interrupted (unfinalized) saves never taken for complete ones."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax import checkpoint as ckpt_lib
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.train.state import TrainState


def toy_state(mesh, width=16, step=3):
  fsdp = NamedSharding(mesh, P(None, "fsdp"))
  rep = NamedSharding(mesh, P())
  w = jnp.arange(4 * width, dtype=jnp.float32).reshape(4, width)
  params = {
      "dense": {"kernel": jax.device_put(w, fsdp), "bias": jax.device_put(jnp.ones((width,)), rep)}
  }
  state = TrainState(
      step=jax.device_put(jnp.asarray(step, jnp.int32), rep),
      params=params,
      ema_params=jax.tree.map(lambda x: x * 0.5, params),
      opt_state={
          "mu": jax.tree.map(jnp.zeros_like, params),
          "count": jax.device_put(jnp.asarray(step), rep),
      },
  )
  return state


def abstract_of(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


CONFIG = {
    "stage": "base64",
    "model": {"base_channels": 16, "channel_mult": [1, 2]},
    "train": {"num_steps": 10},
}


@pytest.fixture
def mesh():
  return mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})


def test_round_trip_keeps_values_shardings_and_data_state(tmp_path, mesh):
  state = toy_state(mesh)
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  data_state = {"shards": [{"last_seen_indices": {"0": 47}}]}
  assert ck.save(3, state, data_state=data_state, config_dict=CONFIG)
  ck.wait()
  assert ck.latest_step() == 3
  assert (tmp_path / "ckpt" / "3" / "data_iter" / "process_0-of-1.json").exists()
  assert ck.saved_config(3) == CONFIG
  restored, ds = ck.restore(3, abstract_of(state), config_dict=CONFIG)
  assert ds == data_state
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding
  ck.close()


def test_restore_into_another_model_fails_before_loading(tmp_path, mesh):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  ck.save(3, toy_state(mesh), data_state={}, config_dict=CONFIG)
  ck.wait()
  other = {**CONFIG, "model": {"base_channels": 32, "channel_mult": [1, 2]}}
  wider = abstract_of(toy_state(mesh, width=32))
  with pytest.raises(
      ckpt_lib.CheckpointMismatchError,
      match=r"different model.*model\.base_channels: 16 in checkpoint, now 32",
  ):
    ck.restore(3, wider, config_dict=other)
  # Same config but a differently shaped state (e.g. another optimizer / edited code).
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"dense/kernel: \(4, 16\) saved"):
    ck.restore(3, wider, config_dict=CONFIG)
  ck.close()


def test_model_fields_added_later_compare_at_their_old_behaviour(tmp_path, mesh):
  """A checkpoint from before `model.text_positions` existed (trained without positions)
  resumes under text_positions=False and is refused under True."""
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  state = toy_state(mesh)
  ck.save(3, state, data_state={}, config_dict=CONFIG)  # CONFIG has no text_positions
  ck.wait()
  model = CONFIG["model"]
  ck.restore(
      3, abstract_of(state), config_dict={**CONFIG, "model": {**model, "text_positions": False}}
  )
  with pytest.raises(
      ckpt_lib.CheckpointMismatchError,
      match=r"model\.text_positions: False in checkpoint, now True",
  ):
    ck.restore(
        3, abstract_of(state), config_dict={**CONFIG, "model": {**model, "text_positions": True}}
    )
  ck.close()


def test_unfinalized_save_is_not_a_checkpoint(tmp_path, mesh):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  ck.save(3, toy_state(mesh), data_state={}, config_dict=CONFIG)
  ck.wait()
  ck.close()
  # A save killed mid-write leaves Orbax's temporary directory (renamed to "<step>" only at
  # finalize) - here with every file of a real step, just never finalized.
  shutil.copytree(tmp_path / "ckpt" / "3", tmp_path / "ckpt" / "7.orbax-checkpoint-tmp")
  os.makedirs(tmp_path / "ckpt" / "9.orbax-checkpoint-tmp-1234")
  ck2 = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  assert ck2.latest_step() == 3 and ck2.all_steps() == [3]
  restored, _ = ck2.restore(3, abstract_of(toy_state(mesh)), config_dict=CONFIG)
  assert int(restored.step) == 3
  ck2.close()


def test_async_save_returns_before_the_write_and_wait_finalizes(tmp_path, mesh):
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  state = toy_state(mesh, width=256)
  ck.save(5, state, data_state={"a": 1}, config_dict=CONFIG)
  ck.wait()
  assert ck.latest_step() == 5
  assert (tmp_path / "ckpt" / "5").is_dir()
  assert not any(".orbax-checkpoint-tmp" in p.name for p in (tmp_path / "ckpt").iterdir())
  ck.close()
