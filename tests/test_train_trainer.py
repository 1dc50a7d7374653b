"""End-to-end training of the tiny stage configs on the shapes data (in process, 8 devices):
the loss falls, SIGTERM leaves a complete checkpoint of the current step, the run resumes
from it, a non-finite loss stops with its step number."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from imagen_jax import checkpoint as ckpt_lib
from imagen_jax.train import trainer
from tests.test_train_step import load_config


def tiny_config(stage, data_dir, **overrides):
  c = load_config(stage)
  c.data.data_dir = str(data_dir)
  c.train.progress_bar = False
  c.mesh.shape = {"data": 4, "fsdp": 2, "tensor": 1}
  for path, value in overrides.items():
    *sections, field = path.split(".")
    node = c
    for s in sections:
      node = node[s]
    node[field] = value
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_tiny_base_trains_survives_sigterm_and_resumes(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  # The tiny base U-Net cut to one resolution level: the default test suite pays for its
  # compiles (the full tiny presets train in the slow tests).
  config = tiny_config(
      "base64",
      data_dir,
      **{
          "train.num_steps": 30,
          "train.ckpt_every": 100,
          "train.log_every": 5,
          "model.channel_mult": (1,),
          "model.attn_resolutions": (16,),
      },
  )

  def sigterm_at_7(step, state, metrics):
    del state, metrics
    if step == 7:
      os.kill(os.getpid(), signal.SIGTERM)

  out = trainer.train_and_evaluate(config, workdir, hooks=[sigterm_at_7])
  assert out["preempted"] and out["step"] == 7
  assert signal.getsignal(signal.SIGTERM) is not None  # handler uninstalled, previous back
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ck.all_steps() == [7]  # complete (finalized) checkpoint of the current step
  assert ck.saved_config(7)["model"] == trainer.config_to_dict(config)["model"]
  ck.close()
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["stage"] == "base64"
  # Resuming with another network is refused, and leaves config.json describing the
  # checkpoint (the sampler rebuilds the network from it).
  other = tiny_config(
      "base64",
      data_dir,
      **{
          "train.num_steps": 30,
          "model.channel_mult": (1,),
          "model.attn_resolutions": (16,),
          "model.text_positions": True,
      },
  )
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="model.text_positions"):
    trainer.train_and_evaluate(other, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["text_positions"] is False

  out = trainer.train_and_evaluate(config, workdir)
  assert not out["preempted"] and out["step"] == 30
  assert int(out["state"].step) == 30
  rows = losses(workdir)
  assert rows[0]["step"] == 5 and rows[-1]["step"] == 30
  assert {"loss", "grad_norm", "lr", "steps_per_sec", "images_per_sec"} <= set(rows[-1])
  first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-2:]])
  assert last < 0.8 * first, [r["loss"] for r in rows]
  # Params are sharded over fsdp (ZeRO-3) where the rules say so.
  specs = [x.sharding.spec for x in jax.tree.leaves(out["state"].params)]
  assert any("fsdp" in str(s) for s in specs)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sr256", "sr1024"])
def test_tiny_sr_stages_train(tmp_path, data_dir, stage):
  # The tiny Efficient U-Nets learn eps more slowly than the base U-Net (their first op is a
  # stride-2 block), so: a constant 1e-2 after warmup (a 60-step cosine would spend half the
  # run near lr 0) and a 3% drop as the bar (a logged row is the mean of 10 steps of batch
  # 8, std ~0.01; measured: sr256 ~0.99 -> ~0.90, sr1024 0.999 -> 0.950).
  workdir = str(tmp_path / stage)
  config = tiny_config(
      stage,
      data_dir,
      **{
          "train.num_steps": 60,
          "train.log_every": 10,
          "train.sample_every": 60,
          "optim.decay": "constant",
          "optim.learning_rate": 1e-2,
      },
  )
  out = trainer.train_and_evaluate(config, workdir)
  rows = losses(workdir)
  assert out["step"] == 60
  assert np.mean([r["loss"] for r in rows[-2:]]) < 0.97 * rows[0]["loss"], rows
  pngs = os.listdir(os.path.join(workdir, "samples"))
  assert any(p.startswith("ema_samples") for p in pngs)
  assert any(p.startswith("real_lowres") for p in pngs)


def test_text_embedding_cache_trains_like_the_encoder(tmp_path, data_dir):
  """`text.embedding_cache` feeds the step the embeddings the frozen encoder would compute:
  same batches, same losses; a cache from another encoder setting is refused up front."""
  from imagen_jax.data import shapes
  from imagen_jax.text import cache as text_cache

  cut = {
      "train.num_steps": 4,
      "train.ckpt_every": 100,
      "train.log_every": 1,
      "model.channel_mult": (1,),
      "model.attn_resolutions": (16,),
  }
  encoded = tiny_config("base64", data_dir, **cut)
  trainer.train_and_evaluate(encoded, str(tmp_path / "encode"))
  cached = tiny_config("base64", data_dir, **cut)
  cached.text.embedding_cache = shapes.build_text_cache(cached, str(tmp_path))
  trainer.train_and_evaluate(cached, str(tmp_path / "cache"))
  want = [r["loss"] for r in losses(str(tmp_path / "encode"))]
  got = [r["loss"] for r in losses(str(tmp_path / "cache"))]
  assert len(got) == 4
  np.testing.assert_allclose(got, want, rtol=1e-4)
  cached.text.max_length = 32
  with pytest.raises(text_cache.CacheError, match=r"max_length=\d+ \(config: 32\)"):
    trainer.train_and_evaluate(cached, str(tmp_path / "mismatch"))


@pytest.mark.slow
def test_nonfinite_loss_stops_with_the_step(tmp_path, data_dir):
  # An absurd learning rate overflows the params within a few steps.
  config = tiny_config(
      "sr256",
      data_dir,
      **{
          "train.num_steps": 20,
          "optim.learning_rate": 1e30,
          "optim.warmup_steps": 0,
          "optim.grad_clip_norm": 0.0,
      },
  )
  with pytest.raises(trainer.NonFiniteLossError, match=r"non-finite loss at step \d+"):
    trainer.train_and_evaluate(config, str(tmp_path / "nan"))
  config.train.nonfinite = "skip"
  out = trainer.train_and_evaluate(config, str(tmp_path / "skip"))
  assert out["step"] == 20
  assert any(r["nonfinite_steps"] > 0 for r in losses(str(tmp_path / "skip")))


def test_metric_writer_outputs(tmp_path):
  from imagen_jax import metrics

  w = metrics.MetricWriter(str(tmp_path))
  w.write_scalars(3, {"loss": 0.5, "grad_norm": float("nan")})
  paths = w.write_images(3, {"ema_samples": np.zeros((5, 4, 4, 3), np.float32)})
  w.write_text(3, "ema_samples_prompts", "a red circle\na blue square")
  w.close()
  assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
      "step": 3,
      "loss": 0.5,
      "grad_norm": "nan",
  }
  from PIL import Image

  assert Image.open(paths[0]).size == (3 * 5 - 1, 2 * 5 - 1)  # 3 x 2 grid, 1 px gaps
  assert (
      (tmp_path / "samples" / "ema_samples_prompts_00000003.txt")
      .read_text()
      .startswith("a red circle")
  )


def test_in_training_sample_grid_is_conditioned_like_the_cascade():
  """The EMA sample grid (`trainer.make_sample_fn`) stands on the stage layer: images of the
  batch's size in [-1, 1], deterministic in the key, and an SR grid follows its low-res input
  (upsampled and noise-augmented at sample.aug_level by `Stage.condition`)."""
  import jax.numpy as jnp

  from tests.test_train_step import make_batch, toy_encode, toy_stage, toy_text_params

  config = load_config("sr256")
  config.sample.num_steps = 2
  st = toy_stage(config)
  params = st.init_params(jax.random.key(0))
  fn = jax.jit(trainer.make_sample_fn(st, toy_encode))
  batch = {k: jnp.asarray(v) for k, v in make_batch("sr256").items()}
  a = np.asarray(fn(params, toy_text_params(), batch, jax.random.key(1)))
  assert a.shape == batch["image"].shape
  assert np.isfinite(a).all() and np.abs(a).max() <= 1.0
  np.testing.assert_array_equal(a, fn(params, toy_text_params(), batch, jax.random.key(1)))
  other = dict(batch, lowres=-batch["lowres"])
  assert not np.allclose(a, fn(params, toy_text_params(), other, jax.random.key(1)), atol=1e-4)


def test_resuming_an_old_layout_checkpoint_fails_clearly(tmp_path, data_dir):
  """A workdir whose checkpoint has the older items (state with the EMA params inside,
  data_iter, config) is refused before anything is trained or config.json is written."""
  import orbax.checkpoint as ocp

  workdir = tmp_path / "old"
  mngr = ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
      item_handlers={
          "state": ocp.StandardCheckpointHandler(),
          "data_iter": ocp.JsonCheckpointHandler(),
          "config": ocp.JsonCheckpointHandler(),
      },
  )
  config = tiny_config("base64", data_dir, **{"train.num_steps": 4})
  old_state = {"step": np.int32(3), "params": {"w": np.ones(3, np.float32)}}
  mngr.save(
      3,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(old_state),
          data_iter=ocp.args.JsonSave({"shards": []}),
          config=ocp.args.JsonSave(trainer.config_to_dict(config)),
      ),
  )
  mngr.close()
  with pytest.raises(ckpt_lib.CheckpointLayoutError, match=r"older layout.*'state'.*Retrain"):
    trainer.train_and_evaluate(config, str(workdir))
  assert not (workdir / "config.json").exists()
