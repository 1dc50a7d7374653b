"""Text embeddings of a prepared dataset in the storage emulator's bucket (`text.shards`):
`python -m imagen_jax.text.precompute` with 2 processes (each its shards, resumable), the
stored embeddings equal the encoder's on the valid tokens, a shard of another encoder is refused
with the reason, and loaders of 2 hosts read the embeddings of their own examples only."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from imagen_jax import paths
from imagen_jax.data import pipeline, records, webdataset
from imagen_jax.text import cache_read, registry, shards
from imagen_jax.train import trainer
from tests.test_bucket import emulator  # noqa: F401 (the fixture)
from tests.test_webdataset import ROOT, shards_in_bucket


def encoder(max_length=64):  # the tiny config's text block
  return registry.get_text_encoder(
      registry.default_text_config("byt5-tiny-random", max_length=max_length), progress=False
  )


def run(data, out, index, count, env, *extra):
  return subprocess.run(
      [sys.executable, "-m", "imagen_jax.text.precompute", "--config=configs/base64.py:tiny"]
      + [f"--data={data}", f"--out={out}", f"--process_index={index}"]
      + [f"--process_count={count}", "--batch_size=8", "--dtype=float32", *extra],
      env={
          **os.environ,
          "PYTHONPATH": ROOT,
          "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
          **env,
      },
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )


# Two processes one after the other (a kill between them): not a concurrent job.
def test_precompute_two_processes_resume_and_refuse_another_encoder(emulator):  # noqa: F811
  data, out = "gs://bucket/pre_data", "gs://bucket/pre_emb"
  webdataset.prepare(shards_in_bucket("gs://bucket/pre_in", [5, 4, 6]), data, min_size=16)
  env = {paths.EMULATOR_ENV: emulator}
  # A process preempted while writing shard 00000: its records are there, its marker is not.
  paths.path(f"{out}/shards/00000.rec").write_bytes(b"cut")
  first = run(data, out, 1, 2, env)  # shard 00001 only
  assert first.returncode == 0, first.stderr[-3000:]
  assert json.loads(first.stdout.splitlines()[-1]) == {"process_index": 1, "finished": False}
  assert not shards.is_shards(out)  # an unfinished run is never taken for a finished one
  second = run(data, out, 0, 2, env)  # shards 00000 (redone) and 00002
  assert second.returncode == 0, second.stderr[-3000:]
  summary = json.loads(second.stdout.splitlines()[-1])
  enc = encoder()
  assert summary == {
      "process_index": 0,
      "finished": True,
      "shards": 3,
      "records": 16,
      "fingerprint": enc.fingerprint,
  }
  source = records.RecordSource(data)
  store = shards.EmbeddingShards(out, source)
  store.check_encoder(enc.name, enc.dim, enc.max_length, enc.fingerprint)
  idx = [0, 5, 9, 14]
  got, got_mask = store.get_batch(idx)
  want, want_mask = enc.encode([source.read_raw(i)["caption"] for i in idx])
  np.testing.assert_array_equal(got_mask, np.asarray(want_mask))
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)
  # Only the valid tokens are stored: each record holds n x D floats.
  for i, m in zip(idx, got_mask):
    s, r = source.locate(i)
    assert store._reader.read_at(s, r)["n"] == int(m.sum()) < enc.max_length

  # Another encoder (max_length 16) on the same folder: refused, the reason named.
  other = run(data, out, 0, 1, env, "--config.text.max_length=16")
  assert other.returncode != 0
  assert "written by another encoder: max_length=64 (this encoder: 16)" in other.stderr
  with pytest.raises(cache_read.CacheError, match="max_length=64 .config: 16."):
    store.check_encoder(enc.name, enc.dim, 16, enc.fingerprint)


def test_precompute_hosts_read_only_their_examples_embeddings(emulator):  # noqa: F811
  data, out = "gs://bucket/pre2_data", "gs://bucket/pre2_emb"
  webdataset.prepare(shards_in_bucket("gs://bucket/pre2_in", [7, 6]), data, min_size=16)
  enc = encoder()
  assert shards.precompute(enc, data, out, batch_size=8, dtype="float32") is not None
  config = pipeline.default_data_config(
      "records", data_dir=data, repeat=False, embedding_id_key="index", keep_caption=True
  )
  # The trainer opens these embeddings only for the records source keyed by index.
  text = registry.default_text_config("byt5-tiny-random", max_length=64, embedding_cache=out)
  opened = trainer.open_text_cache(text, enc, config)
  assert isinstance(opened, shards.EmbeddingShards) and len(opened) == 13
  with pytest.raises(cache_read.CacheError, match="--config.data.embedding_id_key=index"):
    trainer.open_text_cache(text, enc, pipeline.default_data_config("records", data_dir=data))
  with pytest.raises(cache_read.CacheError, match=r"max_length=64 \(config: 16\)"):
    trainer.open_text_cache(text, encoder(16), config)
  stores, loaders = [], []
  for p in range(2):
    stores.append(shards.EmbeddingShards(out, records.RecordSource(data)))
    loaders.append(
        pipeline.make_loader(
            config,
            image_size=16,
            global_batch_size=4,
            seed=1,
            process_index=p,
            process_count=2,
            embedding_lookup=stores[p].get_batch,
        )
    )
  for _ in range(13 // 4):
    for it in loaders:
      batch = next(it)
      want, mask = enc.encode([str(c) for c in batch["caption"]])
      np.testing.assert_allclose(batch["text_emb"], np.asarray(want), atol=1e-5)
      np.testing.assert_array_equal(batch["text_mask"], np.asarray(mask))
  for p in range(2):
    read = stores[p].stats["indices"]  # (shard, record) of every embedding read
    mine = {loaders[p].source.locate(i) for i in loaders[p].source.stats["indices"]}
    assert set(read) == mine and len(read) == len(mine) == 6
  assert not set(stores[0].stats["indices"]) & set(stores[1].stats["indices"])
