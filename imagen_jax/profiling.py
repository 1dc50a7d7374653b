"""`jax.profiler` traces of a window of steps, for TensorBoard's profile plugin.

`train.profile_steps = (start, end)` traces the train steps start + 1 .. end (1-based, as the
metrics count them; `(0, 0)` = off) into `<workdir>/tensorboard/plugins/profile/<run>/`, beside
the run's scalars: `tensorboard --logdir <workdir>/tensorboard` opens it (the profile plugin,
`pip install tensorboard-plugin-profile`). `benchmarks/unet_step.py --profile_steps=START:END`
takes the same window over its timed steps; the sample CLI's `--profile` traces its sampling
(every cascade batch) into `<outdir>/profile`. Each traced train step is a
`StepTraceAnnotation`, so the plugin's step-time view splits the trace by step.

The window's first traced step compiles nothing new (the step is compiled by step start at the
latest, unless start = 0), and the trace stops only after the last traced step's outputs are
ready (`jax.block_until_ready`), so the trace holds whole steps.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import jax

from imagen_jax import paths


def parse_window(value: Any, field: str = "train.profile_steps") -> tuple[int, int]:
  """`(start, end)` from a config tuple / list or a `"START:END"` flag; `(0, 0)` when off."""
  if value is None or value == "" or value == ():
    return 0, 0
  if isinstance(value, str):
    parts = value.split(":")
  else:
    parts = list(value)
  try:
    start, end = (int(p) for p in parts)
  except (TypeError, ValueError):
    start, end = -1, -1
  if not 0 <= start <= end:
    raise ValueError(
        f"{field}={value!r}; allowed: (start, end) with 0 <= start <= end, tracing steps "
        "start + 1 .. end (e.g. (10, 13), or '10:13' as a flag); (0, 0) = off"
    )
  return start, end


def trace_dir(root: str) -> str:
  """Where TensorBoard's profile plugin looks under a log dir `root`."""
  return paths.join(root, "plugins", "profile")


class StepWindow:
  """Starts a trace before step start + 1 and stops it after step end (1-based steps).

  Use: `window.before(step)` before running step `step` (1-based), `window.after(step,
  outputs)` after it; `close()` stops a trace still running (a run that ended early).
  """

  def __init__(self, window: Sequence[int], logdir: str, *, enabled: bool = True):
    self.start, self.end = parse_window(tuple(window))
    self.logdir = logdir
    self.enabled = enabled and self.end > self.start
    self.active = False

  def before(self, step: int) -> contextlib.AbstractContextManager:
    """Call before step `step`; returns the step's trace annotation context (or a no-op)."""
    if self.enabled and not self.active and self.start < step <= self.end:
      paths.makedirs(self.logdir)
      jax.profiler.start_trace(self.logdir)
      self.active = True
    if self.active:
      return jax.profiler.StepTraceAnnotation("train", step_num=step)
    return contextlib.nullcontext()

  def after(self, step: int, outputs: Any = None) -> None:
    if self.active and step >= self.end:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


@contextlib.contextmanager
def trace(logdir: str | None):
  """Traces the block into `logdir` (TensorBoard's log dir); `None`: no trace."""
  if not logdir:
    yield
    return
  paths.makedirs(logdir)
  jax.profiler.start_trace(logdir)
  try:
    yield
  finally:
    jax.profiler.stop_trace()
