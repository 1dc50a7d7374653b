"""img2dataset webdataset shards -> record shards -> training reads from a bucket, no copies.

Small shards written here (tar of jpg + txt + json, with bad samples of every kind) go into the
storage emulator (fake-gcs-server, tests/test_bucket.py); `prepare_webdataset` converts them with
2 processes (resumable: a kill leaves a shard without its report, redone on the next run), and
loaders of 2 hosts read the global stream from the bucket: each reads exactly the records of its
own slice (bytes counted), the global batches equal a 1-host loader's, and a 1-host loader
started at a 2-host position continues the same stream."""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import PIL.Image
import pytest

from imagen_jax import paths
from imagen_jax.data import pipeline, records, webdataset
from tests.test_bucket import emulator  # noqa: F401 (the fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jpeg(w, h, seed):
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def tar_bytes(samples):
  """samples: [(key, {ext: bytes})] -> an uncompressed tar, members in order."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
    for key, parts in samples:
      for ext, data in parts.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def good(key, seed, w=24, h=20):
  meta = json.dumps({"url": f"http://x/{key}.jpg", "caption": f"picture {key}"}).encode()
  return key, {"jpg": jpeg(w, h, seed), "txt": f"picture {key}".encode(), "json": meta}


def shard_with_bad_samples():
  """8 good samples and one of each bad kind the report names."""
  samples = [good(f"a{i:03d}", i) for i in range(8)]
  samples.insert(2, ("bad_img", {"jpg": jpeg(24, 20, 99)[:200], "txt": b"cut image"}))
  samples.insert(4, ("no_cap", {"jpg": jpeg(24, 20, 98), "txt": b"  "}))
  samples.insert(5, ("tiny", {"jpg": jpeg(8, 30, 97), "txt": b"too small"}))
  samples.append(good("a001", 96))  # the key again
  samples.append(("json_cap", good("json_cap", 95)[1] | {"txt": b""}))  # caption from json
  return samples


def test_webdataset_convert_reports_every_bad_sample_and_tar_problem():
  recs, report, _ = webdataset.convert_shard(
      io.BytesIO(tar_bytes(shard_with_bad_samples())), min_size=16
  )
  assert report["decoded"] == len(recs) == 9
  assert report["keys"] == [f"a{i:03d}" for i in range(8)] + ["json_cap"]
  assert report["skipped_by_reason"] == {
      "corrupt image": 1,
      "no caption": 1,
      "too small": 1,
      "duplicate key": 1,
  }
  reasons = {s["key"]: s["reason"] for s in report["skipped"]}
  assert reasons == {
      "bad_img": "corrupt image",
      "no_cap": "no caption",
      "tiny": "too small",
      "a001": "duplicate key",
  }
  rec = records.msgpack.unpackb(recs[-1])
  assert rec["caption"] == "picture json_cap" and rec["image"][:2] == b"\xff\xd8"

  # A shard cut inside its 4th sample: 3 samples kept, the cut one reported.
  whole = tar_bytes([good(f"t{i}", i) for i in range(5)])
  cut = whole[: len(whole) * 7 // 10]
  recs, report, _ = webdataset.convert_shard(io.BytesIO(cut))
  assert report["skipped_by_reason"] == {"truncated shard": 1}
  assert report["decoded"] == len(report["keys"]) == len(recs) >= 2
  assert report["skipped"][0]["key"] == f"t{len(recs)}"

  # A corrupt header (checksum broken) of sample c1's image: the member is reported and lost,
  # the reader resynchronises, c1 is reported by what it lacks, c0 and c2 are kept.
  data = bytearray(tar_bytes([good(f"c{i}", i) for i in range(3)]))
  at = data.index(b"c1.jpg")
  data[at + 100] ^= 0xFF  # inside the header (mode field): checksum no longer matches
  recs, report, _ = webdataset.convert_shard(io.BytesIO(bytes(data)))
  assert report["keys"] == ["c0", "c2"]
  assert report["skipped_by_reason"] == {"corrupt tar member": 1, "no image": 1}


def shards_in_bucket(prefix, counts):
  """Writes img2dataset-style shards {00000..} with `counts[i]` good samples each (images of
  several sizes); shard 1 repeats a key of shard 0. Returns their URLs."""
  urls = []
  for s, n in enumerate(counts):
    samples = [good(f"{s:05d}{i:04d}", 100 * s + i, w=20 + 3 * i, h=18 + i) for i in range(n)]
    if s == 1:
      samples.append(good("000000000", 7))  # a duplicate across shards
    url = f"{prefix}/{s:05d}.tar"
    paths.path(url).write_bytes(tar_bytes(samples))
    urls.append(url)
  return urls


def run_prepare(shards, out, index, count, env):
  return subprocess.run(
      [sys.executable, "-m", "imagen_jax.data.prepare_webdataset", f"--shards={shards}"]
      + [f"--out={out}", f"--process_index={index}", f"--process_count={count}", "--min_size=16"],
      env={**os.environ, "PYTHONPATH": ROOT, **env},
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )


# Two processes one after the other (a kill between them): not a concurrent job.
def test_webdataset_prepare_two_processes_resumes_after_a_kill(emulator, tmp_path):  # noqa: F811
  shards_in_bucket("gs://bucket/wds_in", [6, 5, 7])
  spec = "gs://bucket/wds_in/{00000..00002}.tar"
  out = "gs://bucket/wds_prepared"
  env = {paths.EMULATOR_ENV: emulator}
  # A process killed while writing shard 00002: its records are there, its report is not.
  paths.path(f"{out}/shards/00002.rec").write_bytes(b"half")
  first = run_prepare(spec, out, 1, 2, env)  # process 1 of 2 owns shard 00001 only
  assert first.returncode == 0, first.stderr[-2000:]
  assert json.loads(first.stdout.splitlines()[-1])["finished"] is False
  assert not (paths.path(out) / records.MANIFEST).exists()  # never taken for a finished one
  with pytest.raises(FileNotFoundError, match="not a prepared folder"):
    records.RecordSource(out)
  done_1 = paths.path(f"{out}/shards/00001.json").read_text()
  second = run_prepare(spec, out, 0, 2, env)  # shards 00000 and 00002 (the half one redone)
  assert second.returncode == 0, second.stderr[-2000:]
  summary = json.loads(second.stdout.splitlines()[-1])
  assert summary["finished"] and summary["num_records"] == 6 + 5 + 7
  assert summary["skipped_by_reason"] == {"duplicate key": 1}
  assert paths.path(f"{out}/shards/00001.json").read_text() == done_1  # finished: untouched
  manifest = json.loads((paths.path(out) / records.MANIFEST).read_text())
  assert [s["excluded"] for s in manifest["shards"]] == [[], [5], []]
  source = records.RecordSource(out)
  keys = [source.read_raw(i)["key"] for i in range(len(source))]
  assert len(keys) == len(set(keys)) == 18 and keys[6] == "000010000" and keys[11] == "000020000"
  # Rerunning a finished preparation changes nothing.
  again = run_prepare(spec, out, 1, 2, env)
  assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1])["finished"]


def loaders(root, count, *, start=0, batch=4, shuffle=True):
  config = pipeline.default_data_config(
      "records", data_dir=root, shuffle=shuffle, repeat=False, crop="random", extra_keys=("key",)
  )
  return [
      pipeline.make_loader(
          config,
          image_size=16,
          global_batch_size=batch,
          seed=5,
          process_index=p,
          process_count=count,
          start_index=start,
      )
      for p in range(count)
  ]


def test_webdataset_hosts_read_only_their_slice_from_the_bucket(emulator, tmp_path):  # noqa: F811
  urls = shards_in_bucket("gs://bucket/wds_slice_in", [9, 7, 8])
  out = "gs://bucket/wds_slice"
  manifest = webdataset.prepare(urls, out, min_size=16)
  assert manifest["num_records"] == 24  # 25 samples, one duplicate key excluded
  sizes = []
  for s in manifest["shards"]:
    offsets = np.frombuffer(paths.path(f"{out}/shards/{s['stem']}.idx").read_bytes(), "<u8")
    sizes += [int(b) for j, b in enumerate(np.diff(offsets)) if j not in s["excluded"]]
  total = sum(sizes)

  one = loaders(out, 1)[0]
  steps = 24 // 4  # one pass
  ref = [next(one) for _ in range(steps)]
  with pytest.raises(StopIteration):
    next(one)
  two = loaders(out, 2)
  got = [[next(it) for it in two] for _ in range(steps)]
  for k in range(steps):
    for key in ("key", "image", "caption"):
      np.testing.assert_array_equal(np.concatenate([h[key] for h in got[k]]), ref[k][key])
  # Each host read the records of its own slice once and nothing else: byte for byte.
  reader = records.RecordSource(out)  # another reader: key -> record index
  index_of = {reader.read_raw(i)["key"]: i for i in range(len(reader))}
  assert sorted(one.source.stats["indices"]) == sorted(index_of[k] for b in ref for k in b["key"])
  for p, it in enumerate(two):
    st = it.source.stats
    mine = [index_of[key] for b in ref for key in b["key"][2 * p : 2 * p + 2]]
    assert sorted(st["indices"]) == sorted(mine), p
    assert st["record_bytes"] == sum(sizes[i] for i in mine)
    overhead = st["bytes"] - st["record_bytes"]  # the manifest and index blocks
    index_bytes = 8 * (25 + 3)
    assert overhead <= len(paths.path(f"{out}/dataset.json").read_bytes()) + index_bytes
    assert st["bytes"] < total * 0.6, (st["bytes"], total)  # about half, never the whole
    assert {o.split(".")[-1] for o in st["objects"]} <= {"json", "idx", "rec"}
  # Elastic: a 1-host loader from the 2-host position after 2 steps continues the stream.
  assert two[0].position == steps * 4
  later = loaders(out, 1, start=2 * 4)[0]
  for k in range(2, steps):
    np.testing.assert_array_equal(next(later)["key"], ref[k]["key"])


def test_webdataset_bad_paths_are_named(emulator, tmp_path):  # noqa: F811
  with pytest.raises(ValueError, match="gcsfuse"):
    pipeline.open_data_source(
        pipeline.default_data_config("coco_captions/2014", data_dir="gs://bucket/tfds")
    )
  with pytest.raises(ValueError, match="must name the prepared dataset"):
    pipeline.open_data_source(pipeline.default_data_config("records"))
  with pytest.raises(ValueError, match="names no shard"):
    webdataset.list_shards(" , ")
  with pytest.raises(ValueError, match="share the names"):
    webdataset.prepare(["a/x.tar", "b/x.tar"], str(tmp_path / "o"))
  # A local folder reads the same way (the path of a gcsfuse mount).
  local = tmp_path / "in"
  local.mkdir()
  (local / "00000.tar").write_bytes(tar_bytes([good(f"k{i}", i) for i in range(3)]))
  m = webdataset.prepare(webdataset.list_shards(f"{local}/*.tar"), str(tmp_path / "out"))
  assert m["num_records"] == 3 and m["skipped_by_reason"] == {}
  src = records.RecordSource(str(tmp_path / "out"))
  assert src[2]["image"].shape == (20, 24, 3) and src[2]["caption"] == "picture k2"
  copy = pickle.loads(pickle.dumps(src))  # how grain hands a source to its worker processes
  assert copy[1]["key"] == "k1" and list(copy.stats["indices"]) == [2, 2, 1]


@pytest.mark.slow
@pytest.mark.multihost
def test_webdataset_train_two_processes_from_the_bucket_resume_on_one(emulator, tmp_path):  # noqa: F811
  """2 local processes train 6 steps from the prepared dataset in the bucket, with its
  precomputed text embeddings (checkpoints at 3 and 6); one process resumes the step-3
  checkpoint to step 6 and logs the same loss at steps 4-6 and ends with the same params: it
  read exactly the batches (and embeddings) the 2 processes read."""
  from configs import base64 as base64_config
  from imagen_jax.text import registry, shards
  from tests.test_elastic import launch, params, result
  from tests.test_train_trainer import losses

  urls = shards_in_bucket("gs://bucket/wds_train_in", [10, 10])
  data, emb = "gs://bucket/wds_train", "gs://bucket/wds_train_t5"
  assert webdataset.prepare(urls, data, min_size=16)["num_records"] == 20
  encoder = registry.get_text_encoder(base64_config.get_config("tiny").text, progress=False)
  assert shards.precompute(encoder, data, emb, batch_size=8, dtype="float32") is not None
  o = {
      "data.name": "records",
      "data.data_dir": data,
      "data.embedding_id_key": "index",
      "text.embedding_cache": emb,
      "train.progress_bar": False,
      "train.log_every": 1,
      "train.ckpt_every": 3,
      "train.num_steps": 6,
      "model.channel_mult": [1],
      "model.attn_resolutions": [16],
      "mesh.shape": {"data": 4, "fsdp": 2, "tensor": 1},
  }
  two = tmp_path / "two"
  for rc, out, err in launch(tmp_path, two, o, processes=2):
    assert rc == 0, err[-3000:]
    assert result(out) == {"step": 6, "preempted": False}
  one = tmp_path / "one"
  shutil.copytree(two, one)
  shutil.rmtree(one / "checkpoints" / "6")
  os.remove(one / "final_params.npz")
  os.remove(one / "metrics.jsonl")  # the resumed run logs steps 4-6 afresh
  ((rc, out, err),) = launch(tmp_path, one, o, processes=1)
  assert rc == 0, err[-3000:]
  assert result(out) == {"step": 6, "preempted": False}
  want = {r["step"]: r["loss"] for r in losses(two)}
  got = {r["step"]: r["loss"] for r in losses(one)}
  assert sorted(got) == [4, 5, 6]
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5, atol=1e-6)
  a, b = params(one), params(two)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)
  assert not os.path.exists(paths.local_path(data))  # nothing was copied to this host


def test_webdataset_paper_config_without_a_dataset_stops_naming_the_flag(tmp_path):
  """The paper variants name no dataset (toy shapes would train silently): one line names the
  flags, before any work."""
  out = subprocess.run(
      [sys.executable, "-m", "imagen_jax.train", "--config=configs/sr256.py:paper"]
      + [f"--workdir={tmp_path / 'run'}"],
      env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 2, out.stderr[-2000:]  # a user error (imagen_jax.cli)
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("imagen_jax.train: error: no dataset named") and (
      "--config.data.name=records --config.data.data_dir=" in last
  ), last
  assert not (tmp_path / "run").exists()


@pytest.mark.multihost
def test_webdataset_prepare_distributed_takes_the_hosts_place_from_jax(emulator):  # noqa: F811
  """`--distributed`: one command on every host; jax's cluster detection (SLURM's variables
  here, a TPU pod's metadata there) gives each process its index and the count."""
  from tests.test_bucket import free_port

  shards_in_bucket("gs://bucket/wds_dist_in", [3, 4, 2])
  port = free_port()
  procs = []
  for i in range(2):
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2"}
    slurm.update(SLURM_PROCID=str(i), SLURM_LOCALID=str(i))
    cmd = [sys.executable, "-m", "imagen_jax.data.prepare_webdataset", "--distributed"]
    cmd += ["--shards=gs://bucket/wds_dist_in/*.tar", "--out=gs://bucket/wds_dist", "--min_size=16"]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **slurm}
    env.update({paths.EMULATOR_ENV: emulator, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}"})
    procs.append(
        subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    )
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err.decode()[-3000:]
  summaries = [json.loads(out.decode().splitlines()[-1]) for out, _ in outs]
  assert [(s["process_index"], s["shards"]) for s in summaries] == [(0, 2), (1, 1)]
  assert (
      records.RecordSource("gs://bucket/wds_dist").manifest["num_records"] == 9
  )  # 10 samples, one key twice
