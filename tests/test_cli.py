"""Every command is a quiet tool (`imagen_jax.cli`): library INFO off unless `--verbosity`,
a user error is one line on stderr with exit status 2, an internal error keeps its traceback.

The commands run in child processes: absl flags are per process.
"""

import functools
import importlib
import json
import logging
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import base64
from imagen_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(command, *args, cwd=REPO, timeout=300):
  """`command` is a module (`imagen_jax.train`) or a script path (`experiments/x.py`)."""
  head = [sys.executable, command] if command.endswith(".py") else [sys.executable, "-m", command]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run(
      head + list(args), capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env
  )


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  """A workdir whose config.json records a tiny base64 run (what the trainer writes first)."""
  d = tmp_path_factory.mktemp("base_run")
  (d / "config.json").write_text(base64.get_config("tiny").to_json())
  return str(d)


MISSING = "/nonexistent/imagen_jax_cli_test"
TRAIN = ["--config=configs/base64.py:tiny", "--workdir=/tmp/unused_cli_test"]
SAMPLE = ["--config=configs/cascade.py:shapes", "--prompt=a red circle", "--outdir=" + MISSING]

# (command, args, what the one line must contain); "{base}" is a base64 run's workdir.
CASES = [
    ("imagen_jax.train", ["--config=configs/base64.py:huge", TRAIN[1]], "unknown variant 'huge'"),
    ("imagen_jax.train", ["--config=configs/nope.py:tiny", TRAIN[1]], "'configs/nope.py'"),
    ("imagen_jax.train", TRAIN + ["--config.train.num_steps=many"], "num_steps=many"),
    ("imagen_jax.train", TRAIN + ["--config.train.num_stepz=3"], 'did you mean "num_steps"'),
    ("imagen_jax.train", TRAIN[:1], "--workdir"),
    ("imagen_jax.train", TRAIN + [f"--config.train.init_from={MISSING}"], MISSING),
    ("imagen_jax.train", TRAIN + ["--config.train.freeze=("], "train.freeze='('"),
    ("imagen_jax.train", TRAIN + ["--config.train.grad_accum_steps=3"], "allowed: 1, 2, 4, 8"),
    (
        "imagen_jax.train",
        ["--config=configs/sr256.py:tiny", "--workdir={base}"],
        "holds another run ('base64' stage)",
    ),
    ("imagen_jax.sampling", ["--config=configs/cascade.py:tiny", "--prompt=a"], "'tiny'"),
    ("imagen_jax.sampling", SAMPLE + ["--sampler=bogus"], "'bogus'"),
    ("imagen_jax.sampling", SAMPLE + ["--num_per_prompt=two"], "--num_per_prompt=two"),
    (
        "imagen_jax.sampling",
        SAMPLE + ["--config.num_stages=1", f"--config.stage1.workdir={MISSING}"],
        f"no trained stage in '{MISSING}'",
    ),
    ("imagen_jax.sampling", SAMPLE + [f"--prompt_file={MISSING}.txt"], f"{MISSING}.txt"),
    # The CLIs' earlier names run the same commands.
    ("imagen_jax.main", ["--config=configs/base64.py:huge", TRAIN[1]], "unknown variant 'huge'"),
    ("imagen_jax.sample", ["--config=configs/cascade.py:tiny", "--prompt=a"], "'tiny'"),
    ("experiments/drawbench.py", [f"--prompts={MISSING}.tsv"], f"{MISSING}.tsv"),
    ("experiments/drawbench_score.py", [f"--sheets={MISSING}.csv"], f"{MISSING}.csv"),
    (
        "experiments/coco_guidance_sweep.py",
        [f"--inception={MISSING}.safetensors", "--clip_path=/tmp"],
        f"{MISSING}.safetensors",
    ),
    ("experiments/coco_fid30k.py", [f"--inception={MISSING}.st"], f"{MISSING}.st"),
    ("experiments/guidance_sweep.py", ["--config=configs/cascade.py:wide"], "'wide'"),
    ("experiments/guidance_gap.py", ["--outdir=/tmp/x", "--num_prompts=-"], "num_prompts"),
    ("aot/compile_stage.py", ["--config=configs/base64.py:tiny", "--topology=v9-8"], "v9-8"),
    ("aot/compile_cascade.py", ["--topology=v4-8", "--mesh=data:2"], "'data:2'"),
    (
        "aot/compile_cascade.py",
        ["--topology=v4-8", "--cascade.stage3.batch_size=12"],
        "--cascade.stage3.batch_size=12 is not a divisor of the cascade's batch "
        "--cascade.batch_size=32 that divides over its 4 batch shards; allowed: 0 (the cascade's "
        "batch) or one of [4, 8, 16, 32]",
    ),
    ("aot/scale_table.py", [f"{MISSING}.json"], f"{MISSING}.json"),
    ("benchmarks/unet_step.py", ["--batch=eight"], "--batch=eight"),
    ("imagen_jax.evals.convert_weights", [f"--inception_pth={MISSING}.pth", "--out=x"], MISSING),
    ("imagen_jax.evals.convert_weights", ["--out=x"], "--inception_pth"),
]


@pytest.mark.parametrize(
    "command, args, expected", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)]
)
def test_user_error_is_one_line_exit_2(command, args, expected, base_workdir):
  proc = run(command, *[a.replace("{base}", base_workdir) for a in args])
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == cli.USER_ERROR_STATUS, proc.stdout + proc.stderr
  assert len(lines) == 1, proc.stderr
  name = command if not command.endswith(".py") else os.path.basename(command)
  assert lines[0].startswith(f"{name}: error: "), lines[0]
  assert expected.lower() in lines[0].lower(), lines[0]
  assert "Traceback" not in proc.stderr + proc.stdout


SCRIPT = """
import logging, sys
from absl import app, logging as absl_logging
from imagen_jax import cli
import fake_library  # in another folder: a library

def main(argv):
  if sys.argv[-1] == "ok":
    absl_logging.info("own info line")
    fake_library.chatter()
  if sys.argv[-1] == "internal":
    raise RuntimeError("an internal bug")
  if sys.argv[-1] == "usage":
    raise app.UsageError("--x=3: allowed 1 or 2")

cli.run(main)
"""
LIBRARY = """
import logging
from absl import logging as absl_logging

def chatter():
  absl_logging.info("library absl info line")
  logging.getLogger("orbax").info("library info line")
  logging.getLogger("orbax").warning("library warning line")
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  (root / "tool").mkdir()
  (root / "lib").mkdir()
  (root / "tool" / "tool.py").write_text(SCRIPT)
  (root / "lib" / "fake_library.py").write_text(LIBRARY)
  return str(root / "tool" / "tool.py")


def run_tool(script, *args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + script.replace("tool/tool.py", "lib"))
  return subprocess.run(
      [sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=120
  )


def test_library_info_is_off_by_default_and_one_flag_away(script):
  quiet = run_tool(script, "ok")
  assert quiet.returncode == 0, quiet.stderr
  assert "own info line" in quiet.stderr and "library warning line" in quiet.stderr
  assert "library info line" not in quiet.stderr and "library absl info" not in quiet.stderr
  loud = run_tool(script, "--verbosity=0", "ok")
  assert loud.returncode == 0, loud.stderr
  assert "library info line" in loud.stderr and "library absl info line" in loud.stderr
  assert "own info line" in loud.stderr


def test_internal_error_keeps_its_traceback(script):
  proc = run_tool(script, "internal")
  assert proc.returncode == 1
  assert "Traceback" in proc.stderr and "RuntimeError: an internal bug" in proc.stderr


def test_usage_error_in_main_is_one_line(script):
  proc = run_tool(script, "usage")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == ["tool.py: error: --x=3: allowed 1 or 2"]


@pytest.mark.parametrize("name", sorted(cli.USER_ERRORS))
def test_user_error_names_are_exception_classes(name):
  module, _, cls = name.rpartition(".")
  obj = getattr(importlib.import_module(module), cls)
  assert isinstance(obj, type) and issubclass(obj, Exception), name


def test_is_user_error_covers_subclasses():
  from imagen_jax import checkpoint

  assert cli.is_user_error(checkpoint.CheckpointLayoutError("x"))  # a CheckpointMismatchError
  assert not cli.is_user_error(ValueError("x")) and not cli.is_user_error(KeyError("x"))


def test_one_line_strips_config_flags_traceback():
  message = (
      "flag --config=configs/base64.py:foo: Error whilst parsing config file:\n\n"
      'Traceback (most recent call last):\n  File "x.py", line 1, in get_config\n'
      "ValueError: unknown variant 'foo'; allowed: paper, tiny, shapes"
  )
  assert cli.one_line(message) == (
      "flag --config=configs/base64.py:foo: unknown variant 'foo'; allowed: paper, tiny, shapes"
  )
  assert cli.one_line("a\n  b") == "a b"


def test_filter_keeps_warnings_and_our_info(tmp_path):
  keep = cli._LibraryInfoFilter([str(tmp_path)])

  def record(level, path):
    return logging.LogRecord("x", level, path, 1, "m", (), None)

  assert keep.filter(record(logging.INFO, str(tmp_path / "ours.py")))
  assert not keep.filter(record(logging.INFO, "/site-packages/orbax/checkpoint.py"))
  assert keep.filter(record(logging.WARNING, "/site-packages/orbax/checkpoint.py"))
  assert json.dumps(cli.our_folders())  # the package folder at least


def test_batch_not_dividing_the_devices_is_refused_with_the_sizes_that_do():
  from imagen_jax.sampling import hosts

  class Model:
    batch_multiple = 4
    stages = ()

    def set_stage_batch_sizes(self, sizes):
      assert list(sizes) == []  # no stages, none set

  assert hosts.check_batch_size(Model(), 8) == 8
  with pytest.raises(ValueError, match=r"--config.batch_size=6 .* a multiple of 4, e.g. 4 or 8"):
    hosts.check_batch_size(Model(), 6)
  with pytest.raises(ValueError, match=r"--batch_size=3 .* a multiple of 4, e.g. 4$"):
    hosts.application_batch_size(Model(), 3, None)
  assert hosts.application_batch_size(Model(), None, _Cfg()) == 12  # the config's


_Cfg = functools.partial(ml_collections.ConfigDict, {"batch_size": 12})


def test_sample_cli_refuses_a_batch_that_does_not_divide():
  from tests import cascade_fixtures

  proc = cascade_fixtures.run_sample_cli("--prompt=a", "--outdir=/tmp/unused_cli_out", batch_size=7)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert "--config.batch_size=7 does not divide over the 8 batch shards" in lines[0]
  assert "allowed: a multiple of 8, e.g. 8" in lines[0]
