"""Input-pipeline throughput (examples/s) per cascade stage on the offline shapes data.

  python benchmarks/data_throughput.py --data_dir=/tmp/shapes_bench [--batch=32] [--seconds=10]

Stages measured (the grain loader of imagen_jax.data.pipeline, one host, byte tokenizer):
  base64   shapes at 256 -> resize to 64                        image [b, 64, 64, 3]
  sr256    shapes at 256 -> image 256 + lowres 64               image [b, 256, 256, 3] + [b, 64, 64, 3]
  sr1024   shapes at 1024 -> 256 crops + their 64 lowres crops  (App. F.3 crop training)
plus 'read' (decode only, no preprocessing) for each source resolution. Builds the datasets on
first use (the 1024 one takes a while: drawing at 4x is 4096^2 per shape).
Prints one line per stage and, with --json_out, writes the figures.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from imagen_jax import cli
from imagen_jax.data import pipeline, shapes

_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/imagen_jax_shapes_bench", "TFDS data_dir")
_BATCH = flags.DEFINE_integer("batch", 32, "host batch size")
_SECONDS = flags.DEFINE_float("seconds", 10.0, "measuring time per stage (after a warm-up batch)")
_WORKERS = flags.DEFINE_integer("num_workers", 0, "grain worker processes")
_N256 = flags.DEFINE_integer("num_256", 1024, "examples in the 256 shapes split")
_N1024 = flags.DEFINE_integer("num_1024", 128, "examples in the 1024 shapes split")
_STAGES = flags.DEFINE_list("stages", ["base64", "sr256", "sr1024"], "stages to measure")
_JSON = flags.DEFINE_string("json_out", "", "write the figures here as JSON")

TEXT_LEN = 128


def byte_tokenizer(texts):
  """Stand-in tokenizer (UTF-8 bytes); the real one is the text package's."""
  ids = np.zeros((len(texts), TEXT_LEN), np.int32)
  for i, t in enumerate(texts):
    b = np.frombuffer(t.encode("utf-8")[:TEXT_LEN], np.uint8)
    ids[i, : len(b)] = b.astype(np.int32) + 1
  return ids, ids > 0


STAGES = {  # name: (source resolution, image_size, lowres_size, sr_crop_size)
    "base64": (256, 64, None, 0),
    "sr256": (256, 256, 64, 0),
    "sr1024": (1024, 1024, 256, 256),
}


def measure(it, seconds: float) -> tuple[float, int]:
  batch = next(it)  # warm-up (opens files, first decode)
  size = len(next(iter(batch.values())))
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(it)
    n += size
  return n / (time.perf_counter() - start), n


def main(argv):
  del argv
  results = {
      "batch": _BATCH.value,
      "num_workers": _WORKERS.value,
      "loadavg_start": os.getloadavg(),
      "cpus": os.cpu_count(),
      "stages": {},
  }
  for name in _STAGES.value:
    if name not in STAGES:
      raise app.UsageError(f"stage {name!r} is not one of {sorted(STAGES)}")
    res, size, low, crop = STAGES[name]
    num = _N256.value if res == 256 else _N1024.value
    t0 = time.perf_counter()
    shapes.build_shapes(_DATA_DIR.value, res, num_train=num, num_test=8)
    build_s = time.perf_counter() - t0
    cfg = pipeline.default_data_config(
        "shapes",
        data_dir=_DATA_DIR.value,
        resolution=res,
        num_train=num,
        num_test=8,
        crop="random",
        sr_crop_size=crop,
        num_workers=_WORKERS.value,
    )
    it = pipeline.make_loader(
        cfg,
        image_size=size,
        lowres_size=low,
        global_batch_size=_BATCH.value,
        tokenizer=byte_tokenizer,
        seed=0,
        process_index=0,
        process_count=1,
    )
    rate, n = measure(it, _SECONDS.value)
    batch = next(it)
    shapes_str = {k: list(v.shape) for k, v in batch.items()}
    # decode only: the same source read through the data source, no preprocessing
    source = pipeline.open_data_source(cfg, build=False)
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < min(_SECONDS.value, 5.0):
      source[k % len(source)]
      k += 1
    read_rate = k / (time.perf_counter() - t0)
    results["stages"][name] = {
        "examples_per_s": rate,
        "measured_examples": n,
        "read_only_examples_per_s": read_rate,
        "source_resolution": res,
        "batch_shapes": shapes_str,
        "dataset_build_s_or_reuse": build_s,
    }
    print(
        f"{name:7s} {rate:8.1f} ex/s  (decode only at {res}: {read_rate:7.1f} ex/s)  "
        f"{shapes_str}",
        flush=True,
    )
  results["loadavg_end"] = os.getloadavg()
  print(
      f"load average start {results['loadavg_start']}, end {results['loadavg_end']} "
      f"on {results['cpus']} CPUs"
  )
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  cli.run(main)
