"""End-to-end training of the tiny stage configs on the shapes data (in process, 8 devices):
the loss falls, SIGTERM leaves a complete checkpoint of the current step, the run resumes
from it (with settings that keep its meaning; other ones are refused before anything loads and
leave config.json alone), metric rows are not duplicated by a resume, bad settings are refused
before the compile, a non-finite loss stops with its step number, and with nonfinite='skip'
a run of non-finite steps in a row stops while isolated ones are reported at exit."""

import json
import logging
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


# The tiny base U-Net cut to one resolution level: the default test suite pays for its compiles
# (the full tiny presets train in the slow tests).
CUT = {"model.channel_mult": (1,), "model.attn_resolutions": (16,)}


def test_tiny_base_trains_survives_sigterm_and_resumes(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  config = tiny_config(
      "base64",
      data_dir,
      **{"train.num_steps": 20, "train.ckpt_every": 100, "train.log_every": 5, **CUT},
  )

  def sigterm_at_7(step, state, metrics):
    del state, metrics
    if step == 7:
      os.kill(os.getpid(), signal.SIGTERM)

  out = trainer.train_and_evaluate(config, workdir, hooks=[sigterm_at_7])
  assert out["preempted"] and out["step"] == 7
  assert signal.getsignal(signal.SIGTERM) is not None  # handler uninstalled, previous back
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
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
  # A run killed after logging past its last checkpoint (SIGKILL mid-save) left these rows,
  # the last one cut mid-write: the resumed run logs those steps again, once.
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 10, "loss": 99.0}\n{"step": 15, "loss": 99.0}\n{"step": 2')

  # num_steps does not change what the run means: resuming with more steps is allowed.
  config = tiny_config(
      "base64",
      data_dir,
      **{"train.num_steps": 30, "train.ckpt_every": 100, "train.log_every": 5, **CUT},
  )
  out = trainer.train_and_evaluate(config, workdir)
  assert not out["preempted"] and out["step"] == 30
  assert int(out["state"].step) == 30
  rows = losses(workdir)
  assert [r["step"] for r in rows] == [5, 7, 10, 15, 20, 25, 30]
  assert all(r["loss"] != 99.0 for r in rows)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["num_steps"] == 30
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
          "train.ckpt_every": 100,  # the final step's checkpoint only: 5 saves fewer
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

  cut = {"train.num_steps": 4, "train.ckpt_every": 100, "train.log_every": 1, **CUT}
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
  # Skipping does not hide a diverged run: every step is non-finite, so it stops.
  config.train.nonfinite = "skip"
  with pytest.raises(trainer.NonFiniteLossError, match=r"10 non-finite steps in a row"):
    trainer.train_and_evaluate(config, str(tmp_path / "skip"))


def test_metric_writer_outputs(tmp_path):
  from imagen_jax import metric_writers

  w = metric_writers.MetricWriter(str(tmp_path))
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

  from imagen_jax import stage as stage_lib
  from tests.test_train_step import make_batch, toy_encode, toy_stage, toy_text_params

  config = load_config("sr256")
  config.sample.num_steps = 2
  st = toy_stage(config)
  params = st.init_params(jax.random.key(0))
  settings = stage_lib.SamplingSettings.from_config(config.sample)
  fn = jax.jit(trainer.make_sample_fn(st, toy_encode, settings))
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


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("train.ckpt_every", 0, r"train.ckpt_every=0; allowed: an int > 0"),
        ("train.log_every", 0, r"train.log_every=0; allowed: an int > 0"),
        ("train.sample_every", -1, r"train.sample_every=-1; allowed: an int >= 0"),
        ("train.num_steps", 0, r"train.num_steps=0"),
        ("train.nonfinite", "ignore", r"train.nonfinite='ignore'; allowed: stop, skip"),
        ("train.max_nonfinite_steps", 0, r"train.max_nonfinite_steps=0"),
        ("train.keep_period", -5, r"train.keep_period=-5"),
        ("train.ema_decay", 1.5, r"train.ema_decay=1.5"),
    ],
)
def test_bad_settings_refused_before_the_compile(
    tmp_path, data_dir, monkeypatch, field, value, message
):
  def built(*args, **kwargs):
    raise AssertionError("the mesh was built before the settings were checked")

  monkeypatch.setattr(trainer.mesh_lib, "make_mesh", built)
  config = tiny_config("base64", data_dir, **{"train.global_batch_size": 8, field: value})
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))


def test_resume_refuses_changed_meaning_before_loading_and_keeps_config_json(
    tmp_path, data_dir, monkeypatch
):
  """An eps / cosine / 64-token checkpoint resumed with target=v, schedule=linear_beta,
  max_length=32: refused naming each field, before the text encoder is even built."""
  from tests import cascade_fixtures

  workdir = tmp_path / "run"
  config = tiny_config("base64", data_dir, **{"text.max_length": 64})
  cascade_fixtures.write_stage(str(workdir), config)
  before = (workdir / "config.json").read_bytes()

  def built(*args, **kwargs):
    raise AssertionError("the text encoder was built before the resume was checked")

  monkeypatch.setattr(trainer.registry, "get_text_encoder", built)
  changed = tiny_config(
      "base64",
      data_dir,
      **{
          "diffusion.target": "v",
          "diffusion.schedule": "linear_beta",
          "text.max_length": 32,
      },
  )
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    trainer.train_and_evaluate(changed, str(workdir))
  for text in (
      "diffusion.schedule: 'cosine' in checkpoint, now 'linear_beta'",
      "diffusion.target: 'eps' in checkpoint, now 'v'",
      "text.max_length: 64 in checkpoint, now 32",
      "--config.diffusion.target=eps",
  ):
    assert text in str(e.value)
  assert (workdir / "config.json").read_bytes() == before


def test_resume_refuses_other_text_encoder_weights(tmp_path, data_dir):
  """Same encoder name, other weights (the recorded fingerprint differs): refused at the
  restore, naming both fingerprints; config.json untouched."""
  from tests import cascade_fixtures

  workdir = tmp_path / "run"
  config = tiny_config("base64", data_dir)
  cascade_fixtures.write_stage(str(workdir), config, fingerprint="0" * 16)
  before = (workdir / "config.json").read_bytes()
  with pytest.raises(
      ckpt_lib.CheckpointMismatchError,
      match=r"text.fingerprint: '0{16}' in checkpoint, now '[0-9a-f]{16}'.*point text.path",
  ):
    trainer.train_and_evaluate(config, str(workdir))
  assert (workdir / "config.json").read_bytes() == before


def _nan_images_at(monkeypatch, steps):
  """Makes the batches of `steps` (1-based) all-NaN images: their loss is non-finite."""
  to_global = trainer.pipeline.to_global_batch
  count = [0]

  def poisoned(host_batch, *args, **kwargs):
    count[0] += 1
    if count[0] in steps:
      host_batch = dict(host_batch, image=np.full_like(host_batch["image"], np.nan))
    return to_global(host_batch, *args, **kwargs)

  monkeypatch.setattr(trainer.pipeline, "to_global_batch", poisoned)


def test_nonfinite_skip_reports_skipped_steps_at_exit(tmp_path, data_dir, monkeypatch, caplog):
  _nan_images_at(monkeypatch, {3, 4})
  config = tiny_config(
      "base64",
      data_dir,
      **{
          "train.num_steps": 6,
          "train.log_every": 3,
          "train.ckpt_every": 100,
          "train.nonfinite": "skip",
          "train.max_nonfinite_steps": 3,
          **CUT,
      },
  )
  with caplog.at_level(logging.WARNING):
    out = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert out["step"] == 6 and out["skipped_steps"] == [3, 4]
  assert "2 of the steps of this run were non-finite and skipped" in caplog.text
  rows = losses(str(tmp_path / "run"))
  assert [(r["step"], r["nonfinite_steps"], r["nonfinite_steps_total"]) for r in rows] == [
      (3, 1.0, 1.0),
      (6, 1.0, 2.0),
  ]


def test_nonfinite_skip_stops_after_consecutive_steps(tmp_path, data_dir, monkeypatch):
  _nan_images_at(monkeypatch, set(range(2, 100)))
  config = tiny_config(
      "base64",
      data_dir,
      **{
          "train.num_steps": 40,
          "train.log_every": 100,  # the check does not wait for a logged row
          "train.ckpt_every": 100,
          "train.nonfinite": "skip",
          "train.max_nonfinite_steps": 3,
          **CUT,
      },
  )
  stopped = []
  with pytest.raises(
      trainer.NonFiniteLossError,
      match=r"3 non-finite steps in a row \(2\.\.4\) with train.nonfinite='skip' "
      r"\(train.max_nonfinite_steps=3\): the run diverged",
  ):
    trainer.train_and_evaluate(
        config, str(tmp_path / "run"), hooks=[lambda step, *_: stopped.append(step)]
    )
  assert max(stopped) <= 2 * 3  # found within max_nonfinite_steps of the third bad step


def test_disk_full_during_training_is_one_error_and_keeps_the_last_checkpoint(
    tmp_path, data_dir, monkeypatch
):
  import errno

  import orbax.checkpoint as ocp

  write = ocp.StandardCheckpointHandler.async_save
  full = [False]

  def maybe_full(self, *args, **kwargs):
    if full[0]:
      raise OSError(errno.ENOSPC, "No space left on device")
    return write(self, *args, **kwargs)

  def disk_fills_at_3(step, *_):
    full[0] = step >= 3

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", maybe_full)
  config = tiny_config(
      "base64",
      data_dir,
      **{"train.num_steps": 6, "train.ckpt_every": 2, "train.log_every": 2, **CUT},
  )
  workdir = tmp_path / "run"
  with pytest.raises(
      ckpt_lib.CheckpointSaveError,
      match=r"save of step 4 .* the disk is full\. The last complete checkpoint \(step 2\) is kept",
  ):
    trainer.train_and_evaluate(config, str(workdir), hooks=[disk_fills_at_3])
  ck = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True)
  assert ck.all_steps() == [2]
  ck.close()
