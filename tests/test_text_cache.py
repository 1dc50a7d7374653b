"""Text embedding cache: roundtrip (float32 / bfloat16), lookup by id, half-written refusal,
several writers at once (`-k concurrent`), manifests that do not match their records."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time

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
  # with the mode of a makedirs folder (not mkdtemp's 0o700), its files an open() file's
  plain = tmp_path / "plain"
  plain.mkdir()
  (plain / "f").write_text("x")
  assert os.stat(out).st_mode & 0o777 == plain.stat().st_mode & 0o777
  assert os.stat(os.path.join(out, "manifest.json")).st_mode & 0o777 == (
      (plain / "f").stat().st_mode & 0o777
  )
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


# ---- several writers, interrupted writers, manifests that do not match their records ----

# One writer in its own process: write_cache with an encoder whose tokenize pauses at its
# `pause_at`-th call (records of the first batches already on disk): with `mode` "meet" it
# waits there until `writers` writers have arrived (so all are mid-write at once), notes the
# writers' folders it sees and waits until all have looked; with "hang" it signals and sleeps
# until killed; with "ensure" it runs ensure_cache on the captions instead.
WRITER = r"""
import json, os, sys, time
from imagen_jax.text import cache, registry

out, tag, examples, overwrite, meet_dir, writers, mode, pause_at = sys.argv[1:]
examples = json.loads(examples)
encoder = registry.get_text_encoder(registry.default_text_config("byt5-tiny-random", max_length=16))
seen = []


def meet(step):
  open(os.path.join(meet_dir, f"{tag}.{step}"), "w").close()
  deadline = time.time() + 60
  while time.time() < deadline:
    if sum(n.endswith("." + step) for n in os.listdir(meet_dir)) >= int(writers):
      return
    time.sleep(0.05)

class Paused:
  def __init__(self, enc):
    self.enc, self.calls = enc, 0

  def __getattr__(self, name):
    return getattr(self.enc, name)

  def tokenize(self, texts):
    self.calls += 1
    if self.calls == int(pause_at):
      meet("arrived")
      if mode == "hang":
        time.sleep(600)
      seen.extend(os.path.basename(t) for t in cache._temporaries(out))
      meet("listed")  # nobody goes on before every writer has looked
    return self.enc.tokenize(texts)

try:
  if mode == "ensure":  # the caption-keyed cache of the shapes data set and the apps
    cache.ensure_cache(Paused(encoder), [t for _, t in examples], out, progress=False)
    manifest = cache.TextEmbeddingCache(out).manifest
  else:
    manifest = cache.write_cache(
        Paused(encoder), examples, out, batch_size=2, overwrite=overwrite == "1", progress=False
    )
  result = dict(ok=True, manifest=manifest, seen=seen)
except cache.CacheError as e:
  result = dict(ok=False, error=str(e), seen=seen)
with open(os.path.join(os.path.dirname(meet_dir), tag + ".json"), "w") as f:
  json.dump(result, f)
"""

RED = [(f"k{i}", f"a red shape number {i}") for i in range(5)]
BLUE = [(f"k{i}", f"a blue shape number {i}") for i in range(5)]  # same ids, other captions


def _start_writer(tmp_path, tag, examples, *, overwrite=False, writers=2, mode="meet", pause=2):
  meet = tmp_path / "meet"
  meet.mkdir(exist_ok=True)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  args = [str(tmp_path / "out" / "cache"), tag, json.dumps(examples), "1" if overwrite else "0"]
  args += [str(meet), str(writers), mode, str(pause)]
  return subprocess.Popen(
      [sys.executable, "-c", WRITER, *args], env=env, stderr=subprocess.PIPE, text=True
  )


def _finish(proc, tmp_path, tag):
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  return json.loads((tmp_path / f"{tag}.json").read_text())


def _assert_whole_cache_of(encoder, out, examples):
  """The published cache holds exactly `examples`, its records match its manifest and its
  embeddings are the encoder's for those captions."""
  manifest = cache.verify_records(out)  # every record's id and writer against the manifest
  c = cache.TextEmbeddingCache(out)
  assert c.ids == [k for k, _ in examples] and manifest == c.manifest
  got, got_mask = c.get_batch(c.ids)
  want, want_mask = encoder.encode([t for _, t in examples])
  np.testing.assert_array_equal(got_mask, np.asarray(want_mask))
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)
  c.close()
  return manifest


@pytest.fixture(scope="module")
def encoder16():
  return registry.get_text_encoder(registry.default_text_config("byt5-tiny-random", max_length=16))


@pytest.mark.parametrize("case", ["same_captions", "other_captions", "other_captions_overwrite"])
def test_concurrent_writers_publish_one_whole_cache(encoder16, tmp_path, case):
  second = RED if case == "same_captions" else BLUE
  overwrite = case == "other_captions_overwrite"
  procs = [
      _start_writer(tmp_path, "red", RED, overwrite=overwrite),
      _start_writer(tmp_path, "blue", second, overwrite=overwrite),
  ]
  red, blue = (_finish(p, tmp_path, t) for p, t in zip(procs, ["red", "blue"]))
  out = str(tmp_path / "out" / "cache")
  # Both were mid-write at once, each in its own folder, and neither folder was deleted under
  # its writer (a writer whose folder vanished fails before publishing).
  assert len(set(red["seen"])) == 2 and set(red["seen"]) == set(blue["seen"])
  assert cache._temporaries(out) == []  # both folders gone after publishing or dropping them
  published = cache.TextEmbeddingCache(out).manifest
  if case == "same_captions":  # one published, the other found the same content and reused it
    assert red["ok"] and blue["ok"]
    assert red["manifest"] == blue["manifest"] == published
    _assert_whole_cache_of(encoder16, out, RED)
  elif case == "other_captions":  # the later one is refused, naming the conflict
    assert [red["ok"], blue["ok"]].count(True) == 1
    loser = blue if red["ok"] else red
    assert "other content is already at" in loser["error"]
    assert "while this writer was encoding" in loser["error"]
    winner, examples = (red, RED) if red["ok"] else (blue, BLUE)
    assert winner["manifest"] == published
    _assert_whole_cache_of(encoder16, out, examples)
  else:  # both replace: the cache is whole, all from one of them
    assert red["ok"] and blue["ok"]
    examples = RED if published == red["manifest"] else BLUE
    assert published in (red["manifest"], blue["manifest"])
    _assert_whole_cache_of(encoder16, out, examples)


def test_concurrent_ensure_cache_keeps_every_callers_captions(encoder16, tmp_path):
  # Two builders of one caption cache with different captions (pause 0: no pause; ensure_cache
  # holds the cache lock while it encodes, so they run one after the other in either order).
  procs = [
      _start_writer(tmp_path, t, ex, mode="ensure", pause=0) for t, ex in [("r", RED), ("b", BLUE)]
  ]
  for proc, tag in zip(procs, ["r", "b"]):
    assert _finish(proc, tmp_path, tag)["ok"]
  out = str(tmp_path / "out" / "cache")
  c = cache.TextEmbeddingCache(out)
  captions = sorted(t for _, t in RED + BLUE)
  assert c.ids == captions and c.manifest["keyed_by"] == "caption"
  c.close()
  _assert_whole_cache_of(encoder16, out, [(t, t) for t in captions])


def test_concurrent_writer_killed_mid_write_blocks_nothing(encoder16, tmp_path):
  proc = _start_writer(tmp_path, "killed", RED, writers=1, mode="hang")
  deadline = time.time() + 120
  while not (tmp_path / "meet" / "killed.arrived").exists():
    assert proc.poll() is None and time.time() < deadline, "the writer did not start"
    time.sleep(0.1)
  proc.kill()  # SIGKILL with its first batch written
  proc.wait()
  out = str(tmp_path / "out" / "cache")
  (dead,) = cache._temporaries(out)
  assert any(f.endswith(".array_record") for f in os.listdir(dead))  # it died mid-write
  assert not os.path.exists(out)  # nothing published
  with pytest.raises(cache.CacheError, match=r"does not exist \(writer folders .* did not finish"):
    cache.TextEmbeddingCache(out)
  # The next writer is not blocked: it writes, publishes and removes the dead writer's folder
  # (its writer lock went with the killed process).
  cache.write_cache(encoder16, BLUE, out, batch_size=2, progress=False)
  assert cache._temporaries(out) == []
  _assert_whole_cache_of(encoder16, out, BLUE)


def test_concurrent_live_writer_folder_is_kept(encoder16, tmp_path):
  out = str(tmp_path / "cache")
  live, fd = cache._new_temporary(out, lock_held=False)  # a writer of this cache, mid-write
  try:
    cache.write_cache(encoder16, RED, out, batch_size=2, progress=False)
    assert cache._temporaries(out) == [live]  # another writer left it alone
  finally:
    os.close(fd)
  cache.write_cache(encoder16, BLUE, out, overwrite=True, progress=False)
  assert cache._temporaries(out) == []  # its writer gone, the next writer cleaned it


def test_concurrent_manifest_not_matching_records_is_refused(encoder16, tmp_path):
  red, blue = str(tmp_path / "red"), str(tmp_path / "blue")
  cache.write_cache(encoder16, RED, red, batch_size=2, progress=False)
  cache.write_cache(encoder16, BLUE, blue, batch_size=2, progress=False)
  # One writer's manifest and ids over another writer's records (same ids and counts).
  for name in (cache.MANIFEST, cache.IDS_FILE):
    shutil.copy(os.path.join(red, name), os.path.join(blue, name))
  with pytest.raises(cache.CacheError, match="do not describe these records"):
    cache.TextEmbeddingCache(blue)
  with pytest.raises(cache.CacheError, match="record 0 of embeddings-00000.array_record"):
    cache.verify_records(blue)
  # ids.json edited under its manifest (two ids swapped: the count still matches).
  ids_file = os.path.join(red, cache.IDS_FILE)
  ids = json.load(open(ids_file))
  ids[0], ids[1] = ids[1], ids[0]
  open(ids_file, "w").write(json.dumps(ids))
  with pytest.raises(cache.CacheError, match="ids.json does not match the manifest's ids_sha256"):
    cache.TextEmbeddingCache(red)
  # Fewer ids than the manifest's count.
  manifest = json.load(open(os.path.join(red, cache.MANIFEST)))
  manifest.pop("ids_sha256")
  open(os.path.join(red, cache.MANIFEST), "w").write(json.dumps(manifest))
  open(ids_file, "w").write(json.dumps(ids[:4]))
  with pytest.raises(cache.CacheError, match="4 ids but manifest says 5"):
    cache.TextEmbeddingCache(red)


def test_concurrent_reader_sees_a_whole_cache_through_overwrites(encoder16, tmp_path):
  out = str(tmp_path / "cache")
  sets = {"red": RED, "blue": BLUE}
  first = {}
  for examples in sets.values():
    m = cache.write_cache(encoder16, examples, out, overwrite=True, batch_size=8, progress=False)
    first[m["examples_sha256"]] = cache.TextEmbeddingCache(out).get("k0")[0]
  opened, errors, stop = [], [], threading.Event()

  def read():
    while not stop.is_set():
      try:
        c = cache.TextEmbeddingCache(out)
        opened.append((c.manifest["examples_sha256"], c.get("k0")[0]))
        c.close()
      except Exception as e:  # noqa: BLE001  any failure to read is what this test looks for
        errors.append(repr(e))

  reader = threading.Thread(target=read)
  reader.start()
  try:
    for name in ["red", "blue"] * 3:  # each replace swaps the folders in one rename
      cache.write_cache(encoder16, sets[name], out, overwrite=True, batch_size=8, progress=False)
  finally:
    stop.set()
    reader.join()
  assert errors == [] and len(opened) > 0
  for digest, emb in opened:  # every cache opened was one writer's, whole
    np.testing.assert_array_equal(emb, first[digest])
