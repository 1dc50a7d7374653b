"""Text embedding cache: roundtrip (float32 / bfloat16), lookup by id, half-written refusal,
several writers at once (`-k concurrent`), manifests that do not match their records."""

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
  assert cache._temporaries(out) == []  # the writer's folder became the cache
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
  # A writer that died before finishing leaves only its own folder.
  dead = out + cache.TMP_INFIX + "abcd1234"
  shutil.copytree(out, dead)
  os.remove(os.path.join(dead, cache.MANIFEST))
  shutil.rmtree(out)
  with pytest.raises(cache.CacheError, match=r"does not exist \(writer folders"):
    cache.TextEmbeddingCache(out)
  with pytest.raises(cache.CacheError, match="is a writer's folder"):
    cache.TextEmbeddingCache(dead)
  # A directory with records but no manifest (e.g. copied mid-write) is refused too.
  os.rename(dead, out)
  with pytest.raises(cache.CacheError, match="no manifest.json"):
    cache.TextEmbeddingCache(out)


def test_same_content_reused_other_content_refused_and_overwrite(encoder, tmp_path):
  out = str(tmp_path / "cache")
  first = cache.write_cache(encoder, EXAMPLES[:3], out, progress=False)
  stamp = os.path.getmtime(os.path.join(out, cache.MANIFEST))
  # The same (id, caption) pairs in another order: the cache there is returned, not rewritten.
  assert cache.write_cache(encoder, EXAMPLES[:3][::-1], out, progress=False) == first
  assert os.path.getmtime(os.path.join(out, cache.MANIFEST)) == stamp
  with pytest.raises(cache.CacheError, match=r"other content is already at .*examples_sha256"):
    cache.write_cache(encoder, EXAMPLES[:2], out, progress=False)
  with pytest.raises(cache.CacheError, match=r"other content .*dtype='float32' \(this writer: "):
    cache.write_cache(encoder, EXAMPLES[:3], out, dtype="bfloat16", progress=False)
  assert cache.TextEmbeddingCache(out).manifest == first  # the refusals changed nothing
  man_file = os.path.join(out, cache.MANIFEST)
  man = json.load(open(man_file))
  man["shards"][0]["num_records"] = 4
  json.dump(man, open(man_file, "w"))
  with pytest.raises(cache.CacheError, match="other than 3 records"):
    cache.TextEmbeddingCache(out)
  with pytest.raises(cache.CacheError, match="is not a whole cache"):
    cache.write_cache(encoder, EXAMPLES[:3], out, progress=False)
  cache.write_cache(encoder, EXAMPLES[:2], out, overwrite=True, progress=False)
  assert len(cache.TextEmbeddingCache(out)) == 2


def test_duplicate_ids_and_bad_dtype(encoder, tmp_path):
  with pytest.raises(cache.CacheError, match="duplicate example id '1'"):
    cache.write_cache(encoder, [(1, "a"), ("1", "b")], str(tmp_path / "c"), progress=False)
  assert os.listdir(tmp_path) == []  # refused before any folder or lock was made
  with pytest.raises(cache.CacheError, match="caption of example 'a' is a list"):
    cache.write_cache(encoder, [("a", ["x", "y"])], str(tmp_path / "c"), progress=False)
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


def test_ensure_cache_reuses_only_a_complete_cache_of_the_same_weights(encoder, tmp_path):
  out = str(tmp_path / "captions")
  assert cache.ensure_cache(encoder, ["b", "a", "b"], out, progress=False) == out
  c = cache.TextEmbeddingCache(out)
  assert len(c) == 2 and "a" in c and "b" in c  # keyed by the caption text, once each
  c.close()
  stamp = os.path.getmtime(os.path.join(out, cache.MANIFEST))
  cache.ensure_cache(encoder, ["a"], out, progress=False)  # a subset: reused as is
  assert os.path.getmtime(os.path.join(out, cache.MANIFEST)) == stamp
  # A new caption: rewritten with the cached ones too (another user of the cache keeps its own).
  cache.ensure_cache(encoder, ["a", "c"], out, progress=False)
  c = cache.TextEmbeddingCache(out)
  assert sorted(c.ids) == ["a", "b", "c"]
  c.close()

  class OtherWeights:  # the same encoder under another weights fingerprint
    fingerprint = "other weights"

    def __getattr__(self, name):
      return getattr(encoder, name)

  other = OtherWeights()
  cache.ensure_cache(other, ["a", "c"], out, progress=False)  # other weights: rewritten
  c = cache.TextEmbeddingCache(out)
  assert c.manifest["fingerprint"] == "other weights" and sorted(c.ids) == ["a", "c"]
  # No writer's folder left beside it; the lock file stays (deleting one races its users).
  assert sorted(os.listdir(tmp_path)) == ["captions", "captions.lock"]
  # A cache keyed by ids other than the captions is never taken for a caption cache.
  ids_keyed = str(tmp_path / "ids_keyed")
  cache.write_cache(encoder, [("a", "a blue square")], ids_keyed, progress=False)
  cache.ensure_cache(encoder, ["a"], ids_keyed, progress=False)
  emb, _ = cache.TextEmbeddingCache(ids_keyed).get("a")
  want, _ = encoder.encode(["a", "a blue square"])
  np.testing.assert_allclose(emb, np.asarray(want[0]), atol=1e-5)  # the caption "a", re-encoded
  assert np.abs(np.asarray(want[1]) - np.asarray(want[0])).max() > 0.1


def test_shapes_text_cache_holds_every_training_caption(tmp_path):
  from configs import base64 as base64_config
  from imagen_jax.data import shapes

  c = base64_config.get_config("tiny")
  path = shapes.build_text_cache(c, str(tmp_path))
  assert os.path.basename(path) == f"text_cache_{c.text.name}_L{c.text.max_length}_n64_seed0"
  got = cache.TextEmbeddingCache(path)
  assert all(cap in got for cap in shapes.captions(0, "train", 64))
  got.close()
  with c.unlocked():
    c.data.name = "coco_captions/2014"
  with pytest.raises(ValueError, match="data.name='coco_captions/2014'"):
    shapes.build_text_cache(c, str(tmp_path))
