"""Metric writing behind one small interface: JSONL + PNG files and TensorBoard, on process 0.

A `Writer` has `write_scalars(step, {name: value})`, `write_images(step, {name: [N, H, W, C] in
[-1, 1]})`, `write_texts(step, {name: text})`, `flush()` and `close()` (the interface of clu's
`metric_writers`, which imports TensorFlow; we keep TensorFlow out). Implementations:

* `FileWriter(workdir)`: `workdir/metrics.jsonl` (one JSON object per logged step, `{"step": s,
  "loss": ..., ...}`; NaN / inf as strings, which JSON lacks), image grids as
  `workdir/samples/<name>_<step:08d>.png`, texts as `workdir/samples/<name>_<step:08d>.txt`;
* `TensorBoardWriter(logdir)`: tensorboardX event files;
* `MultiWriter(writers)`: forwards every call to each;
* `MetricWriter(workdir, start_step=...)`: the training writer, a `MultiWriter` of both of the
  above under `workdir` on process 0 and of nothing elsewhere, so callers need no
  `if jax.process_index() == 0`.

A resumed run passes the step it resumes from as `start_step`: `metrics.jsonl` rows past it
(logged by a run killed before its next checkpoint, which the resumed run logs again) are dropped
first, so every step has one row.

The workdir may be a bucket (`gs://...`, `imagen_jax.paths`). An object cannot be appended to,
so there `metrics.jsonl` is kept in memory and uploaded whole at every logged step, and each
TensorBoard event file at every flush (one upload each: a reader sees the previous version or
the new one, `imagen_jax.atomic`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Mapping, Protocol, Sequence, runtime_checkable

import jax
import numpy as np

from imagen_jax import atomic, images, paths


@runtime_checkable
class Writer(Protocol):
  """What the trainer writes to; `step` is the training step of the values."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    ...

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    ...

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    ...

  def flush(self) -> None:
    ...

  def close(self) -> None:
    ...


def _json_value(v: float) -> float | str:
  v = float(v)
  return v if math.isfinite(v) else str(v)  # JSON has no NaN / inf


def drop_rows_after(path: str, step: int) -> int:
  """Rewrites the JSONL file `path` (atomically) without its rows of step > `step` and its
  unreadable lines (a line cut by a kill mid-write); returns how many were dropped."""
  if not paths.path(path).exists():
    return 0
  lines = paths.path(path).read_text().splitlines()
  keep = []
  for line in lines:
    try:
      row_step = int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      continue
    if row_step <= step:
      keep.append(line)
  dropped = len(lines) - len(keep)
  if dropped:
    atomic.write_text(path, "".join(k + "\n" for k in keep))
    logging.warning(
        "%s: dropped %d row(s) past step %d (logged by a run that stopped before checkpointing "
        "them; they are logged again)",
        path,
        dropped,
        step,
    )
  return dropped


class FileWriter:
  """Scalars to `metrics.jsonl` (appended), image grids and texts to `samples/`.

  start_step: when given, rows past it are dropped first (`drop_rows_after`).
  """

  def __init__(self, workdir: str, *, start_step: int | None = None):
    self.workdir = os.fspath(workdir)
    self.samples_dir = paths.join(workdir, "samples")
    paths.makedirs(workdir)
    self._path = paths.join(workdir, "metrics.jsonl")
    if start_step is not None:
      drop_rows_after(self._path, int(start_step))
    self._remote = paths.is_remote(self._path)
    if self._remote:  # no append on a bucket: the whole file is uploaded at each row
      p = paths.path(self._path)
      self._text = p.read_text() if p.exists() else ""
      self._jsonl = None
    else:
      self._jsonl = open(self._path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    row = {"step": int(step), **{k: _json_value(v) for k, v in scalars.items()}}
    if self._remote:
      self._text += json.dumps(row) + "\n"
      atomic.write_text(self._path, self._text)
      return
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()  # a crash loses no logged step

  def image_path(self, name: str, step: int) -> str:
    return paths.join(self.samples_dir, f"{name}_{int(step):08d}.png")

  def write_images(self, step: int, images_: Mapping[str, np.ndarray]) -> list[str]:
    """Each `[N, H, W, C]` batch (float in [-1, 1] or uint8) as one PNG grid; returns the paths."""
    return [images.save_grid(batch, self.image_path(name, step)) for name, batch in images_.items()]

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for name, text in texts.items():
      atomic.write_text(paths.join(self.samples_dir, f"{name}_{int(step):08d}.txt"), text + "\n")

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()


class _BucketEventFile:
  """A tensorboardX record file on a bucket: the events in memory, uploaded whole per flush."""

  def __init__(self, path: str):
    self.path = path
    self._data = bytearray()

  def write(self, data: bytes) -> None:
    self._data += data

  def flush(self) -> None:
    atomic.write_bytes(self.path, bytes(self._data))

  def close(self) -> None:
    self.flush()


class _BucketEventFiles:
  """tensorboardX's writer factory interface for `gs://` (its own one needs another client)."""

  def open(self, path: str) -> _BucketEventFile:
    return _BucketEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # bucket folders are implied by their objects


class TensorBoardWriter:
  """tensorboardX event files under `logdir` (scalars, image grids, texts)."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # deferred: 0.7 s; only process 0 writes

    if paths.is_remote(logdir):
      from tensorboardX import record_writer  # deferred with SummaryWriter

      for scheme in paths.REMOTE_SCHEMES:
        record_writer.register_writer_factory(scheme.split(":")[0], _BucketEventFiles())
    self._tb = SummaryWriter(os.fspath(logdir))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), int(step))

  def write_images(self, step: int, images_: Mapping[str, np.ndarray]) -> None:
    for name, batch in images_.items():
      self._tb.add_image(name, images.image_grid(batch), int(step), dataformats="HWC")

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for name, text in texts.items():
      self._tb.add_text(name, text, int(step))

  def flush(self) -> None:
    self._tb.flush()

  def close(self) -> None:
    self._tb.close()


class MultiWriter:
  """Forwards every call to each writer in order; `MultiWriter([])` writes nothing."""

  def __init__(self, writers: Sequence[Writer]):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step: int, images_: Mapping[str, np.ndarray]) -> None:
    for w in self.writers:
      w.write_images(step, images_)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for w in self.writers:
      w.write_texts(step, texts)

  def flush(self) -> None:
    for w in self.writers:
      w.flush()

  def close(self) -> None:
    for w in self.writers:
      w.close()
    self.writers = []  # a second close is a no-op


class MetricWriter(MultiWriter):
  """The training writer: `FileWriter(workdir)` + `TensorBoardWriter(workdir/tensorboard)`.

  enabled: None = only on process 0 (every other process writes nothing). Without tensorboardX
  installed the TensorBoard part is left out with a warning. start_step: the step the run
  starts from (`FileWriter`).
  """

  def __init__(
      self,
      workdir: str,
      *,
      enabled: bool | None = None,
      tensorboard: bool = True,
      start_step: int | None = None,
  ):
    if enabled is None:
      enabled = jax.process_index() == 0
    writers: list[Writer] = []
    if enabled:
      writers.append(FileWriter(workdir, start_step=start_step))
      if tensorboard:
        try:
          writers.append(TensorBoardWriter(paths.join(workdir, "tensorboard")))
        except ImportError:  # declared in setup.py; JSONL + PNG still work without it
          logging.warning("tensorboardX is not installed: no TensorBoard events")
    super().__init__(writers)
    self.enabled = enabled

  def write_images(self, step: int, images_: Mapping[str, np.ndarray]) -> list[str]:
    """Writes the grids; returns the PNG paths ([] on processes other than 0)."""
    paths = []
    for w in self.writers:
      out = w.write_images(step, images_)
      paths += out if isinstance(w, FileWriter) else []
    return paths

  def write_text(self, step: int, name: str, text: str) -> None:
    """One text (e.g. a sample grid's prompts): `write_texts(step, {name: text})`."""
    self.write_texts(step, {name: text})
