"""Stage configs: paper values (Imagen §4.1, App. F), locking, JSON, flag overrides."""

import importlib.util
import json
import os

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("base64", "sr256", "sr1024")


def load(stage, variant):
  spec = importlib.util.spec_from_file_location(
      f"cfg_{stage}", os.path.join(ROOT, "configs", f"{stage}.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("variant", ("paper", "tiny", "shapes"))
def test_every_variant_builds_and_is_locked(stage, variant):
  c = load(stage, variant)
  assert c.stage == stage
  for section in (
      "model",
      "diffusion",
      "text",
      "data",
      "optim",
      "train",
      "mesh",
      "distributed",
      "sample",
  ):
    assert section in c
  # The paper predicts eps; the CPU demo's stages predict x0 (configs/common.py says why).
  assert c.diffusion.target == ("x0" if variant == "shapes" else "eps")
  assert c.text.drop_prob == 0.1
  assert c.train.nonfinite in ("stop", "skip")
  assert c.model.text_dim > 0
  assert (c.lowres_size > 0) == (stage != "base64")
  assert json.loads(c.to_json())["stage"] == stage
  with pytest.raises(AttributeError, match="num_steps"):
    c.train.num_step = 3  # typo of num_steps: locked configs refuse new fields


@pytest.mark.parametrize("stage", STAGES)
def test_paper_settings(stage):
  c = load(stage, "paper")
  assert c.optim.name == ("adafactor" if stage == "base64" else "adam")
  assert (c.optim.b1, c.optim.b2, c.optim.eps) == (0.9, 0.999, 1e-8)
  assert c.optim.learning_rate == 1e-4 and c.optim.warmup_steps == 10_000
  assert c.optim.decay == "cosine"
  assert c.train.global_batch_size == 2048
  assert c.diffusion.schedule == ("linear_beta" if stage == "sr1024" else "cosine")
  assert (c.diffusion.beta_start, c.diffusion.beta_end) == (1e-4, 0.02)
  assert c.text.name == "t5-v1_1-xxl" and c.model.text_dim == 4096
  if stage == "sr1024":  # trains on 256 crops of 1024 images, 64 crops of the 256 input
    assert (c.image_size, c.lowres_size, c.data.sr_crop_size) == (1024, 256, 256)


def test_unknown_variant_is_a_clear_error():
  with pytest.raises(ValueError, match="allowed: paper, tiny, shapes"):
    load("base64", "huge")


def _parse(monkeypatch, argv):
  # config_flags reads the override flags from sys.argv when it parses --config.
  monkeypatch.setattr("sys.argv", argv)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  fv(argv)
  return fv.config


def test_command_line_overrides_and_typos(monkeypatch):
  path = os.path.join(ROOT, "configs", "sr256.py")
  c = _parse(
      monkeypatch,
      ["prog", f"--config={path}:tiny", "--config.train.num_steps=5", "--config.mesh.shape.fsdp=2"],
  )
  assert c.train.num_steps == 5 and c.mesh.shape.fsdp == 2
  with pytest.raises(Exception, match="num_step"):
    _parse(monkeypatch, ["prog", f"--config={path}:tiny", "--config.train.num_step=5"])
