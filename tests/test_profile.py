"""Profiler traces (imagen_jax/profiling.py): `train.profile_steps` writes a jax.profiler trace
of the window's steps where TensorBoard's profile plugin looks, naming the train step; the
benchmark and the sample CLI take the same window / a whole-run trace."""

import glob
import os
import subprocess
import sys

import pytest

from imagen_jax import profiling
from imagen_jax.train import trainer
from tests import cascade_fixtures
from tests.test_train_trainer import CUT, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def traces(logdir):
  return glob.glob(os.path.join(profiling.trace_dir(logdir), "*", "*.xplane.pb"))


def test_train_profile_steps_writes_a_trace_naming_the_train_step(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(
      "base64",
      tmp_path / "data",
      **{"train.num_steps": 3, "train.profile_steps": (1, 2), "train.log_every": 1, **CUT},
  )
  out = trainer.train_and_evaluate(config, workdir)
  assert out["step"] == 3
  found = traces(os.path.join(workdir, "tensorboard"))
  assert len(found) == 1, found
  data = open(found[0], "rb").read()
  assert b"train_step" in data  # the jitted step's name
  assert b"train" in data and len(data) > 1000


@pytest.mark.parametrize("value", [(2, 1), (-1, 3), "a:b", (1, 2, 3)])
def test_bad_window_is_refused(value):
  with pytest.raises(ValueError, match="allowed: \\(start, end\\)"):
    profiling.parse_window(value)


def test_window_parses_flags_and_configs():
  assert profiling.parse_window("10:13") == (10, 13)
  assert profiling.parse_window((0, 0)) == (0, 0) == profiling.parse_window("")
  assert not profiling.StepWindow((3, 3), "/unused").enabled


def run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
      [sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600
  )


def test_benchmark_takes_the_window(tmp_path):
  proc = run(
      "benchmarks/unet_step.py",
      "--preset=base64:tiny",
      "--batch=2",
      "--steps=1",
      "--fwd_steps=1",
      "--profile_steps=1:2",
      f"--profile_dir={tmp_path}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "trace of steps 2..2" in proc.stdout
  assert len(traces(str(tmp_path))) == 1


def test_sample_cli_profile(tmp_path):
  proc = cascade_fixtures.run_sample_cli(
      "--prompt=a red circle", "--num_per_prompt=1", f"--outdir={tmp_path}", "--profile",
      batch_size=8,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  found = traces(str(tmp_path / "profile"))
  assert len(found) == 1 and os.path.getsize(found[0]) > 1000
