"""Tiny random cascade stages written like trainer workdirs, shared by the experiments tests.

config.json plus an Orbax checkpoint with the trainer's items (train_state, ema_params, config;
the config records the text encoder's fingerprint like the trainer's)
of a tiny network with random weights (shapes traced by the stage layer, values drawn directly).
Sampling does not care whether the weights were trained, so end-to-end tests take seconds.
"""

import atexit
import functools
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import checkpoint as ckpt_lib
from imagen_jax import run_meaning
from imagen_jax.stage import Stage
from imagen_jax.text import registry
from imagen_jax.train import optim, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(stage, **sizes):
  """configs.<stage> `tiny` with top-level fields overridden (e.g. image_size=32)."""
  c = importlib.import_module(f"configs.{stage}").get_config("tiny")
  with c.unlocked():
    for k, v in sizes.items():
      c[k] = v
  return c


def write_stage(workdir, config, seed=0, step=7, fingerprint=None):
  """Writes a random stage workdir that `cascade.load_stage` reads; returns its EMA params.

  fingerprint: the text encoder fingerprint recorded (default: that of `config.text`'s weights,
  as the trainer records it).
  """
  abstract = Stage.from_config(config).abstract_params()
  tx, _ = optim.make_optimizer(config.optim, int(config.train.num_steps))
  # No real initialisation: compiling the U-Net's init costs far more than tracing its shapes
  # on a small CPU, and sampling does not care how weights were drawn; fan-in-scaled normal
  # kernels (and 1 +- noise norm scales) keep activations O(1), and unlike a fresh init (zero
  # output conv) every input changes the output.
  rng = np.random.default_rng(seed)

  def fill(path, a):
    if a.ndim >= 2:
      return jnp.asarray(
          rng.standard_normal(a.shape, np.float32) / np.sqrt(np.prod(a.shape[:-1])), a.dtype
      )
    base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
    return jnp.asarray(base + 0.05 * rng.standard_normal(a.shape, np.float32), a.dtype)

  ema = jax.tree_util.tree_map_with_path(fill, abstract)
  # The trained params differ from their EMA (what a sampler must not pick up).
  params = jax.tree.map(lambda x: x + 1.0, ema)
  opt_state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(tx.init, params))
  train_state = {"step": jnp.asarray(step, jnp.int32), "params": params, "opt_state": opt_state}
  os.makedirs(workdir, exist_ok=True)
  if fingerprint is None:
    fingerprint = registry.get_text_encoder(config.text).fingerprint
  config_dict = run_meaning.with_text_fingerprint(trainer.config_to_dict(config), fingerprint)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config_dict, f)
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ck.save(step, train_state=train_state, ema_params=ema, config_dict=config_dict)
  ck.close()
  return ema


def write_tiny_cascade(root):
  """base (16x16 text->image) and sr (16->32) workdirs under root; returns their paths."""
  base, sr = os.path.join(root, "base"), os.path.join(root, "sr")
  write_stage(base, tiny_config("base64"))
  write_stage(sr, tiny_config("sr256", image_size=32, lowres_size=16), seed=1)
  return base, sr


@functools.lru_cache(maxsize=None)
def shared_tiny_cascade():
  """`write_tiny_cascade` once per test process (several test modules share the stages: the
  jitted init and the checkpoint writes dominate their setup on a small CPU)."""
  root = tempfile.mkdtemp(prefix="imagen_jax_tiny_cascade_")
  atexit.register(shutil.rmtree, root, True)
  return write_tiny_cascade(root)


def run_sample_cli(*flags, batch_size):
  """`python -m imagen_jax.sampling` on the shared tiny cascade (2 steps per stage) with `flags`,
  in a child process (absl flags are per process); returns the finished process."""
  workdirs = shared_tiny_cascade()
  return subprocess.run(
      [
          sys.executable,
          "-m",
          "imagen_jax.sampling",
          "--config=configs/cascade.py:shapes",
          f"--config.stage1.workdir={workdirs[0]}",
          f"--config.stage2.workdir={workdirs[1]}",
          "--config.stage1.num_steps=2",
          "--config.stage2.num_steps=2",
          f"--config.batch_size={batch_size}",
          *flags,
      ],
      capture_output=True,
      text=True,
      cwd=REPO,
      timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
