"""Text embedding cache: roundtrip (float32 / bfloat16), lookup by id, half-written refusal."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from imagen_jax.text import cache, registry
from imagen_jax.text.tokenizer import TruncationWarning


@pytest.fixture(scope="module")
def encoder():
  return registry.get_text_encoder(registry.default_text_config("byt5-tiny-random", max_length=24))


EXAMPLES = [(i * 7, f"caption {i} " + "ab" * i) for i in range(11)] + [("x", ""), ("y", "猫 ✓")]


def test_roundtrip_float32(encoder, tmp_path):
  out = str(tmp_path / "cache")
  with pytest.warns(TruncationWarning):  # the long captions: counted in the manifest
    manifest = cache.write_cache(
        encoder, EXAMPLES, out, batch_size=4, records_per_shard=5, progress=False
    )
  assert manifest["num_examples"] == 13 and len(manifest["shards"]) == 3
  assert manifest["num_truncated"] == 4  # captions 7..10 exceed 23 bytes + EOS
  assert not os.path.exists(out + cache.INCOMPLETE_SUFFIX)
  c = cache.TextEmbeddingCache(out)
  assert len(c) == 13 and 14 in c and "y" in c and "nope" not in c
  with pytest.warns(TruncationWarning):
    want_emb, want_mask = encoder.encode([t for _, t in EXAMPLES])
  got_emb, got_mask = c.get_batch([k for k, _ in EXAMPLES])
  assert got_emb.shape == (13, 24, 256) and got_emb.dtype == np.float32
  np.testing.assert_array_equal(got_mask, np.asarray(want_mask))
  np.testing.assert_allclose(got_emb, np.asarray(want_emb), atol=1e-6)
  emb, mask = c.get("y")  # ids are looked up as str
  assert mask.sum() == len("猫 ✓".encode()) + 1 and np.all(emb[~mask] == 0)
  with pytest.raises(KeyError, match="'missing'"):
    c.get("missing")
  c.close()


def test_roundtrip_bfloat16(encoder, tmp_path):
  out = str(tmp_path / "cache_bf16")
  cache.write_cache(encoder, EXAMPLES[:5], out, dtype="bfloat16", batch_size=8, progress=False)
  shard = os.path.join(out, "embeddings-00000.array_record")
  c = cache.TextEmbeddingCache(out)
  want, _ = encoder.encode([t for _, t in EXAMPLES[:5]])
  got, _ = c.get_batch([k for k, _ in EXAMPLES[:5]])
  np.testing.assert_allclose(got, np.asarray(want), atol=2e-2, rtol=1e-2)
  stored, _ = cache.TextEmbeddingCache(out, dtype="stored").get(0)
  assert stored.dtype.name == "bfloat16"
  # Only real tokens are stored, as raw bfloat16 bytes.
  import msgpack
  from array_record.python.array_record_module import ArrayRecordReader

  rec = msgpack.unpackb(ArrayRecordReader(shard).read([0])[0])
  assert rec["id"] == "0" and rec["n"] == len("caption 0 ") + 1
  assert len(rec["emb"]) == rec["n"] * 256 * 2


def test_half_written_cache_is_refused(encoder, tmp_path):
  out = str(tmp_path / "cache")
  cache.write_cache(encoder, EXAMPLES[:3], out, progress=False)
  # A writer that died before finishing leaves only the .incomplete directory.
  shutil.copytree(out, out + cache.INCOMPLETE_SUFFIX)
  os.remove(os.path.join(out + cache.INCOMPLETE_SUFFIX, cache.MANIFEST))
  shutil.rmtree(out)
  with pytest.raises(cache.CacheError, match=r"does not exist \(a half-written"):
    cache.TextEmbeddingCache(out)
  with pytest.raises(cache.CacheError, match="half-written"):
    cache.TextEmbeddingCache(out + cache.INCOMPLETE_SUFFIX)
  # A directory with records but no manifest (e.g. copied mid-write) is refused too.
  os.rename(out + cache.INCOMPLETE_SUFFIX, out)
  with pytest.raises(cache.CacheError, match="no manifest.json"):
    cache.TextEmbeddingCache(out)


def test_inconsistent_counts_and_overwrite(encoder, tmp_path):
  out = str(tmp_path / "cache")
  cache.write_cache(encoder, EXAMPLES[:3], out, progress=False)
  with pytest.raises(cache.CacheError, match="already exists"):
    cache.write_cache(encoder, EXAMPLES[:3], out, progress=False)
  man_file = os.path.join(out, cache.MANIFEST)
  man = json.load(open(man_file))
  man["shards"][0]["num_records"] = 4
  json.dump(man, open(man_file, "w"))
  with pytest.raises(cache.CacheError, match="holds 3 records, manifest says 4"):
    cache.TextEmbeddingCache(out)
  cache.write_cache(encoder, EXAMPLES[:2], out, overwrite=True, progress=False)
  assert len(cache.TextEmbeddingCache(out)) == 2


def test_duplicate_ids_and_bad_dtype(encoder, tmp_path):
  with pytest.raises(cache.CacheError, match="duplicate example id '1'"):
    cache.write_cache(encoder, [(1, "a"), ("1", "b")], str(tmp_path / "c"), progress=False)
  assert not os.path.exists(str(tmp_path / "c"))  # nothing that looks finished
  with pytest.raises(ValueError, match="cache dtype 'float16'"):
    cache.write_cache(encoder, [], str(tmp_path / "d"), dtype="float16", progress=False)


def test_check_encoder_names_the_mismatch(encoder, tmp_path):
  out = str(tmp_path / "c")
  cache.write_cache(encoder, [("a", "a red circle")], out, progress=False)
  c = cache.TextEmbeddingCache(out)
  c.check_encoder("byt5-tiny-random", 256, 24)  # the writer's own settings pass
  with pytest.raises(cache.CacheError, match=r"max_length=24 \(config: 64\)"):
    c.check_encoder("byt5-tiny-random", 256, 64)
  with pytest.raises(
      cache.CacheError, match=r"encoder='byt5-tiny-random' \(config: 't5-v1_1-xxl'\)"
  ):
    c.check_encoder("t5-v1_1-xxl", 256, 24)
  # Same name and sizes, other weights: refused by the fingerprint.
  c.check_encoder("byt5-tiny-random", 256, 24, encoder.fingerprint)
  other = dataclasses.replace(
      encoder, params={**encoder.params, "token_embedding": encoder.params["token_embedding"] + 1}
  )
  assert other.fingerprint != encoder.fingerprint
  with pytest.raises(cache.CacheError, match=f"fingerprint='{encoder.fingerprint}'"):
    c.check_encoder("byt5-tiny-random", 256, 24, other.fingerprint)
