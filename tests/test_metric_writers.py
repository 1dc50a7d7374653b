"""imagen_jax.metric_writers: the writer interface, JSONL + PNG files, TensorBoard, process 0 only."""

import json
import os

import numpy as np
from PIL import Image

from imagen_jax import metric_writers


def test_default_writer_outputs(tmp_path):
  w = metric_writers.MetricWriter(str(tmp_path), enabled=True)
  assert isinstance(w, metric_writers.Writer) and len(w.writers) == 2
  w.write_scalars(3, {"loss": 0.5, "grad_norm": float("nan")})
  paths = w.write_images(3, {"ema_samples": np.zeros((5, 4, 4, 3), np.float32)})
  assert paths == [str(tmp_path / "samples" / "ema_samples_00000003.png")]
  w.write_text(3, "ema_samples_prompts", "a red circle\na blue square")
  w.write_texts(3, {"other": "x"})
  w.write_scalars(4, {"loss": np.float32(0.25)})
  w.close()
  w.close()  # a second close is a no-op
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x) for x in lines] == [
      {"step": 3, "loss": 0.5, "grad_norm": "nan"},
      {"step": 4, "loss": 0.25},
  ]
  with Image.open(tmp_path / "samples" / "ema_samples_00000003.png") as im:
    assert im.size == (3 * 5 - 1, 2 * 5 - 1)  # 3 x 2 grid, 1 px gaps
  text = (tmp_path / "samples" / "ema_samples_prompts_00000003.txt").read_text()
  assert text.startswith("a red circle")
  events = os.listdir(tmp_path / "tensorboard")
  assert any(e.startswith("events.out.tfevents") for e in events)


def test_disabled_writer_writes_nothing(tmp_path):
  w = metric_writers.MetricWriter(str(tmp_path / "w"), enabled=False)
  w.write_scalars(1, {"loss": 1.0})
  assert w.write_images(1, {"x": np.zeros((1, 2, 2, 3), np.float32)}) == []
  w.write_texts(1, {"t": "x"})
  w.flush()
  w.close()
  assert not (tmp_path / "w").exists()


def test_multi_writer_forwards_in_order():
  calls = []

  class Recorder:

    def __init__(self, name):
      self.name = name

    def write_scalars(self, step, scalars):
      calls.append((self.name, "scalars", step, dict(scalars)))

    def write_images(self, step, images):
      calls.append((self.name, "images", step, sorted(images)))

    def write_texts(self, step, texts):
      calls.append((self.name, "texts", step, dict(texts)))

    def flush(self):
      calls.append((self.name, "flush"))

    def close(self):
      calls.append((self.name, "close"))

  w = metric_writers.MultiWriter([Recorder("a"), Recorder("b")])
  w.write_scalars(2, {"loss": 1.0})
  w.write_texts(2, {"p": "q"})
  w.close()
  assert calls == [
      ("a", "scalars", 2, {"loss": 1.0}),
      ("b", "scalars", 2, {"loss": 1.0}),
      ("a", "texts", 2, {"p": "q"}),
      ("b", "texts", 2, {"p": "q"}),
      ("a", "close"),
      ("b", "close"),
  ]


def test_resumed_writer_drops_rows_past_the_start_step(tmp_path):
  """A run killed after logging steps 10 and 15 (the last row cut mid-write) but checkpointed
  at 7: the resumed writer (start_step=7) keeps one row per step."""
  (tmp_path / "metrics.jsonl").write_text(
      '{"step": 5, "loss": 1.0}\n{"step": 7, "loss": 0.9}\n{"step": 10, "loss": 0.8}\n'
      '{"step": 15, "loss": 0.7}\n{"step": 2'
  )
  w = metric_writers.MetricWriter(str(tmp_path), enabled=True, tensorboard=False, start_step=7)
  w.write_scalars(10, {"loss": 0.5})
  w.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 5, "loss": 1.0}, {"step": 7, "loss": 0.9}, {"step": 10, "loss": 0.5}]
  # Without start_step (not a training run) the file is only appended to.
  metric_writers.MetricWriter(str(tmp_path), enabled=True, tensorboard=False).close()
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
