"""Tiny random cascade stages written like trainer workdirs, shared by the experiments tests.

Copied from tests/test_cascade.py (its helpers are private to that module): config.json plus an
Orbax checkpoint of a freshly initialised, slightly perturbed tiny network. Sampling does not
care whether the weights were trained, so end-to-end tests of the experiments take seconds.
"""
import importlib.util
import json
import os

import jax

from imagen_jax import checkpoint as ckpt_lib
from imagen_jax.nn import unet
from imagen_jax.train import optim, state as state_lib, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(stage, **sizes):
  """configs/<stage>.py:tiny with top-level fields overridden (e.g. image_size=32)."""
  spec = importlib.util.spec_from_file_location(
      f"cfg_{stage}", os.path.join(REPO, "configs", f"{stage}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("tiny")
  with c.unlocked():
    for k, v in sizes.items():
      c[k] = v
  return c


def write_stage(workdir, config, seed=0, step=7):
  """Writes a random stage workdir that `cascade.load_stage` reads."""
  model = unet.build_model(config.model)
  tx, _ = optim.make_optimizer(config.optim, int(config.train.num_steps))
  image, lowres = trainer.train_sizes(config)
  inputs = state_lib.model_inputs(batch=1, image_size=image, lowres_size=lowres,
                                  text_len=int(config.text.max_length),
                                  text_dim=int(config.model.text_dim))
  state = jax.jit(state_lib.make_init_fn(model, tx, inputs))(jax.random.key(seed))
  # A fresh network's zero-initialised output conv ignores its inputs; perturb every weight.
  leaves, tree = jax.tree.flatten(state.ema_params)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  state = state.replace(ema_params=jax.tree.unflatten(tree, [
      p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]))
  os.makedirs(workdir, exist_ok=True)
  config_dict = trainer.config_to_dict(config)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config_dict, f)
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ck.save(step, state, data_state={}, config_dict=config_dict)
  ck.close()


def write_tiny_cascade(root):
  """base (16x16 text->image) and sr (16->32) workdirs under root; returns their paths."""
  base, sr = os.path.join(root, "base"), os.path.join(root, "sr")
  write_stage(base, tiny_config("base64"))
  write_stage(sr, tiny_config("sr256", image_size=32, lowres_size=16), seed=1)
  return base, sr
