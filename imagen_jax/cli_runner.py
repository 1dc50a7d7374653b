"""Run the real trainer from an application: `python -m imagen_jax.train` in a child process.

Applications (the demo, experiments) train stages exactly as a user does from the command line,
with `--config.section.field=value` overrides, and never import `imagen_jax.train`: sampling
code stays independent of training, and each run gets a fresh process (its own JAX state).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence


class TrainingFailed(RuntimeError):
  """The trainer process exited with an error (its output went to the console)."""

  def __init__(self, returncode: int, command: Sequence[str]):
    super().__init__(f"training exited with code {returncode}: {' '.join(command)}")
    self.returncode = returncode


def override_flag(key: str, value: Any) -> str:
  """`--config.<key>=<value>` as config_flags parses it: strings as is, bools as true/false,
  numbers and tuples by repr (e.g. `(1, 2)`)."""
  if value is None:
    raise ValueError(f"config override {key}=None: config_flags cannot set None from a flag")
  if isinstance(value, bool):
    text = "true" if value else "false"
  elif isinstance(value, str):
    text = value
  else:
    text = repr(tuple(value) if isinstance(value, list) else value)
  return f"--config.{key}={text}"


def main_command(config: str, workdir: str, overrides: Mapping[str, Any] = ()) -> list[str]:
  """The trainer's command line. config: `<config file>:<variant>` (config_flags' syntax)."""
  return [
      sys.executable,
      "-m",
      "imagen_jax.train",
      f"--config={config}",
      f"--workdir={workdir}",
      *(override_flag(k, v) for k, v in dict(overrides).items()),
  ]


def train_stage(
    config: str,
    workdir: str,
    overrides: Mapping[str, Any] = (),
    *,
    deadline_s: float | None = None,
    env: Mapping[str, str] | None = None,
) -> bool:
  """Trains (or resumes) one stage to `train.num_steps`; returns True when it got there.

  deadline_s: after this many seconds the trainer gets SIGTERM, saves a checkpoint at the step
  reached and exits (its preemption path); then the result is False.
  Raises `TrainingFailed` when the trainer exits with an error.
  """
  return run_until(main_command(config, workdir, overrides), deadline_s=deadline_s, env=env)


def run_until(
    command: Sequence[str], *, deadline_s: float | None = None, env: Mapping[str, str] | None = None
) -> bool:
  """Runs `command`; after `deadline_s` seconds sends it SIGTERM and waits for it to exit.

  Returns True when it exited by itself, False when the deadline stopped it; raises
  `TrainingFailed` on a non-zero exit code.
  """
  proc = subprocess.Popen(list(command), env=None if env is None else {**os.environ, **env})
  start, stopped = time.monotonic(), False
  try:
    while True:
      left = None if deadline_s is None or stopped else deadline_s - (time.monotonic() - start)
      try:
        code = proc.wait(timeout=None if left is None else max(left, 0.0))
        break
      except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        stopped = True
  except BaseException:
    proc.kill()
    proc.wait()
    raise
  if code != 0:
    raise TrainingFailed(code, command)
  return not stopped
