"""Elastic resume: the global batches do not depend on the process count, a checkpoint holds one
global data position, a run restores onto another mesh shape (fsdp 4 -> 2), an older checkpoint
with per-process iterator state is refused (or restarted from its step on request), and (slow,
2 local processes on 127.0.0.1) a checkpoint of 1 process resumes on 2, SIGTERM to one of them
makes both save the same step, and 1 process resumes that, matching the uninterrupted run step
for step."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax import checkpoint as ckpt_lib
from imagen_jax.data import pipeline, shapes
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.train import settings, trainer
from tests.test_checkpoint import CONFIG, abstract_of, position, toy_items
from tests.test_train_multiprocess import env, free_port
from tests.test_train_trainer import CUT, losses, tiny_config


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("shapes32")
  shapes.build_shapes(d, 32, num_train=20, num_test=4, seed=0)
  return str(d)


def host_batches(shapes_dir, *, count, start=0, steps=6, batch=8):
  """[step][process] host batches of a `count`-process run read from global example `start`."""
  config = pipeline.default_data_config(
      "shapes",
      data_dir=shapes_dir,
      resolution=32,
      num_train=20,
      num_test=4,
      crop="random",  # augmentation must not depend on the process count either
      extra_keys=("index",),
  )
  loaders = [
      pipeline.make_loader(
          config,
          image_size=16,
          global_batch_size=batch,
          tokenizer=None,
          seed=3,
          process_index=p,
          process_count=count,
          start_index=start,
      )
      for p in range(count)
  ]
  out = [[next(it) for it in loaders] for _ in range(steps)]
  assert {it.position for it in loaders} == {start + steps * batch}
  return out


def global_batch(parts, key):
  return np.concatenate([p[key] for p in parts])


def test_elastic_global_batches_do_not_depend_on_process_count(shapes_dir):
  """6 steps of 8 from 20 records cross two epoch boundaries; every process count reads the same
  global batches (records, random crops and captions), and a loader started at a position
  continues the stream on any process count."""
  one = host_batches(shapes_dir, count=1)
  for count in (2, 4):
    many = host_batches(shapes_dir, count=count)
    for k in range(6):
      for key in ("index", "image", "caption"):
        np.testing.assert_array_equal(
            global_batch(many[k], key), global_batch(one[k], key), err_msg=f"{count} {k} {key}"
        )
  ids = np.concatenate([global_batch(b, "index") for b in one])
  # each epoch is a permutation of the 20 records, and the two epochs' orders differ
  assert sorted(ids[:20].tolist()) == sorted(ids[20:40].tolist()) == list(range(20))
  assert ids[:20].tolist() != ids[20:40].tolist()
  # a checkpoint taken after 2 steps on 1 process continues on 2 processes (and back)
  for count, start in ((2, 16), (1, 16), (4, 24)):
    later = host_batches(shapes_dir, count=count, start=start, steps=6 - start // 8)
    for k, parts in enumerate(later):
      for key in ("index", "image"):
        np.testing.assert_array_equal(
            global_batch(parts, key), global_batch(one[start // 8 + k], key)
        )


def test_elastic_checkpoint_restores_onto_another_mesh_shape(tmp_path):
  """Arrays saved sharded over fsdp=4 restore into fsdp=2 shardings with the same values."""
  mesh4 = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  mesh2 = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  train_state, ema = toy_items(mesh4)
  ck.save(
      3, train_state=train_state, ema_params=ema, data_position=position(24), config_dict=CONFIG
  )
  ck.wait()
  kernel = train_state["params"]["dense"]["kernel"]
  assert kernel.sharding.mesh.shape["fsdp"] == 4

  def onto(tree):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(mesh2, x.sharding.spec)
        ),
        tree,
    )

  got_state, got_ema = ck.restore(
      3, train_state=onto(train_state), ema_params=onto(ema), config_dict=CONFIG
  )
  for want, got in ((train_state, got_state), (ema, got_ema)):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert b.sharding.mesh.shape == mesh2.shape
  assert got_state["params"]["dense"]["kernel"].sharding.spec == P(None, "fsdp")
  ck.close()


@pytest.mark.slow  # two compiles of the tiny base stage
def test_elastic_trainer_resumes_on_another_mesh_shape(tmp_path):
  """A tiny base run checkpointed on (data 2, fsdp 4) resumes on (data 4, fsdp 2): the state is
  resharded, the data continues at the saved global position, metrics continue the steps."""
  workdir = str(tmp_path / "run")
  common = {"train.ckpt_every": 100, "train.log_every": 1, **CUT}
  data_dir = tmp_path / "data"
  first = tiny_config(
      "base64",
      data_dir,
      **{"train.num_steps": 2, "mesh.shape": {"data": 2, "fsdp": 4, "tensor": 1}, **common},
  )
  out = trainer.train_and_evaluate(first, workdir)
  assert out["step"] == 2
  batch = int(first.train.global_batch_size)
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  assert ck.data_position(2)["next_example"] == 2 * batch
  ck.close()
  seen = []

  def record_mesh(step, state, metrics):
    del metrics
    leaf = max(jax.tree.leaves(state.params), key=lambda x: x.size)
    seen.append((step, dict(leaf.sharding.mesh.shape)))

  second = tiny_config(
      "base64",
      data_dir,
      **{"train.num_steps": 3, "mesh.shape": {"data": 4, "fsdp": 2, "tensor": 1}, **common},
  )
  out = trainer.train_and_evaluate(second, workdir, hooks=[record_mesh])
  assert out["step"] == 3 and seen[0][0] == 3
  assert seen[0][1]["fsdp"] == 2 and seen[0][1]["data"] == 4
  assert [r["step"] for r in losses(workdir)] == [1, 2, 3]
  assert np.isfinite(losses(workdir)[-1]["loss"])
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  assert ck.data_position(3)["next_example"] == 3 * batch
  ck.close()


def _per_process_checkpoint(directory, mesh):
  """A step written with per-process grain iterator state (`data_iter_0`) instead of a global
  data position."""
  train_state, ema = toy_items(mesh)
  mngr = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
      item_handlers={
          "train_state": ocp.StandardCheckpointHandler(),
          "ema_params": ocp.StandardCheckpointHandler(),
          "config": ocp.JsonCheckpointHandler(),
          "data_iter_0": ocp.JsonCheckpointHandler("process_0-of-1.json"),
      },
  )
  mngr.save(
      3,
      args=ocp.args.Composite(
          train_state=ocp.args.StandardSave(train_state),
          ema_params=ocp.args.StandardSave(ema),
          config=ocp.args.JsonSave(CONFIG),
          data_iter_0=ocp.args.JsonSave({"last_seen_indices": {"0": 23}}),
      ),
  )
  mngr.wait_until_finished()
  mngr.close()
  return train_state, ema


def test_elastic_per_process_iterator_checkpoint_is_refused_or_restarted_from_its_step(tmp_path):
  mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  train_state, ema = _per_process_checkpoint(tmp_path / "ckpt", mesh)
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  # the train state itself still restores
  got, _ = ck.restore(3, train_state=abstract_of(train_state), ema_params=abstract_of(ema))
  assert int(got["step"]) == 3
  with pytest.raises(
      ckpt_lib.CheckpointLayoutError,
      match=r"per process \(\['data_iter_0'\].*data_position_from_step=True",
  ):
    ck.data_position(3)
  assert ck.data_position(3, from_step=True) is None
  ck.close()
  config = tiny_config("base64", tmp_path / "data", **{"train.global_batch_size": 8})
  assert (
      trainer.data_start(settings.LoaderSettings.from_config(config), None, 3) == 24
  )  # step x global batch


# --- 2 local processes (slow) ------------------------------------------------------------------

RUNNER = r"""
import json, os, signal, sys
workdir, overrides, term_at = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
from configs import base64 as base64_config
config = base64_config.get_config("tiny")
for path, value in overrides.items():
    *sections, field = path.split(".")
    node = config
    for s in sections:
        node = node[s]
    node[field] = tuple(value) if isinstance(value, list) else value
from imagen_jax.parallel import mesh as mesh_lib
mesh_lib.maybe_initialize_distributed(config.distributed)
import jax, numpy as np
from jax.experimental import multihost_utils
from imagen_jax.train import trainer

def sigterm(step, state, metrics):  # a preemption notice to this process alone
    if step == term_at:
        os.kill(os.getpid(), signal.SIGTERM)

out = trainer.train_and_evaluate(config, workdir, hooks=[sigterm] if term_at else [])
print("RESULT", json.dumps({"step": out["step"], "preempted": out["preempted"]}), flush=True)
params = multihost_utils.process_allgather(out["state"].params, tiled=True)
if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(workdir, "final_params.npz"), **flat)
"""

NUM_STEPS = 10


def overrides(data_dir, **extra):
  o = {
      "data.data_dir": str(data_dir),
      "train.progress_bar": False,
      "train.log_every": 1,  # every step's loss: the batches must match step for step
      "train.ckpt_every": 5,
      "train.num_steps": NUM_STEPS,
      "model.channel_mult": [1],
      "model.attn_resolutions": [16],
      "mesh.shape": {"data": 4, "fsdp": 2, "tensor": 1},
  }
  o.update(extra)
  return o


def launch(tmp_path, workdir, o, *, processes, term_at=None):
  """Runs the job on `processes` local processes (8 fake devices in all); `term_at`
  {process: step} sends that process SIGTERM at that step. Returns [(rc, stdout, stderr)]."""
  script = tmp_path / "elastic_runner.py"
  script.write_text(RUNNER)
  port = free_port()
  procs = []
  for i in range(processes):
    oi = dict(o)
    if processes > 1:
      oi.update(
          {
              "distributed.initialize": True,
              "distributed.coordinator_address": f"127.0.0.1:{port}",
              "distributed.num_processes": processes,
              "distributed.process_id": i,
              "distributed.cpu_collectives": "gloo",
          }
      )
    cmd = [sys.executable, str(script), str(workdir), json.dumps(oi)]
    cmd.append(str((term_at or {}).get(i, 0)))
    e = env(8 // processes)
    procs.append(
        subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    )
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=900)
    out.append((p.returncode, stdout, stderr))
  return out


def result(stdout):
  line = [x for x in stdout.splitlines() if x.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :])


def params(workdir):
  with np.load(os.path.join(workdir, "final_params.npz")) as f:
    return {k: f[k] for k in f.files}


def assert_same_run(workdir, reference):
  """Same loss at every step and the same final params as the uninterrupted run. Tolerance:
  gloo's cross-process reduction order against one process's (float32 rounding, 1e-5)."""
  got, want = losses(workdir), losses(reference)
  assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, NUM_STEPS + 1))
  np.testing.assert_allclose(
      [r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5, atol=1e-6
  )
  a, b = params(workdir), params(reference)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.slow
@pytest.mark.multihost
def test_elastic_multihost_preempt_resume_one_to_two_to_one_processes(tmp_path):
  """One process trains 10 steps uninterrupted (the reference; checkpoints at 5 and 10). Its
  step-5 checkpoint resumes on 2 processes (1 -> 2); SIGTERM to process 1 alone at step 7 makes
  both save the same step (jax's preemption sync point: the step after the last one either
  process reported) and exit with status 0; one process resumes from it (2 -> 1) to step 10.
  Every step's loss and the final params match the reference: each segment read exactly the
  batches of the uninterrupted run."""
  data_dir = tmp_path / "data"
  reference = tmp_path / "reference"
  ((rc, out, err),) = launch(tmp_path, reference, overrides(data_dir), processes=1)
  assert rc == 0, err[-3000:]
  assert result(out) == {"step": NUM_STEPS, "preempted": False}

  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(NUM_STEPS))
  os.remove(workdir / "final_params.npz")
  term_at = 7
  runs = launch(tmp_path, workdir, overrides(data_dir), processes=2, term_at={1: term_at})
  for rc, _, err in runs:
    assert rc == 0, err[-3000:]
  results = [result(out) for _, out, _ in runs]
  # Both stopped at the same step, though process 0 never got a signal: the coordination
  # service told it.
  assert results[0] == results[1], results
  saved = results[0]["step"]
  assert results[0]["preempted"] and term_at <= saved < NUM_STEPS, results
  steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert steps == [5, saved]

  ((rc, out, err),) = launch(tmp_path, workdir, overrides(data_dir), processes=1)
  assert rc == 0, err[-3000:]
  assert result(out) == {"step": NUM_STEPS, "preempted": False}
  assert_same_run(workdir, reference)
