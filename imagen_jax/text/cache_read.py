"""Read side of the text-embedding cache: open a published cache and look embeddings up by id.

The layout, the record format and the writers' protocol are in ``imagen_jax.text.cache`` (the
write side, which re-exports these names). Readers take no lock. On open they check the format,
``ids.json`` against the manifest's count and digest, each shard's record count and the ids and
writer token of each shard's first and last records; every lookup checks its record's id;
``verify_records`` reads every record. A mismatch is refused with a ``CacheError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Sequence

import ml_dtypes
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from imagen_jax import atomic, paths

FORMAT = "imagen_jax.text_embedding_cache/v1"
MANIFEST = "manifest.json"
IDS_FILE = "ids.json"
TMP_INFIX = ".incomplete-"  # a writer's folder: <dir>.incomplete-XXXXXXXX
_DTYPES = ("float32", "bfloat16")


class CacheError(RuntimeError):
  """The cache directory is missing, half-written or inconsistent."""


def _np_dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f"cache dtype {name!r}; allowed: {_DTYPES}")
  if name == "bfloat16":
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(np.float32)


def _shard_name(i: int) -> str:
  return f"embeddings-{i:05d}.array_record"


def _file_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _temporaries(out_dir: str) -> list[str]:
  """The writers' folders of the cache at `out_dir`, live or dead."""
  parent, base = os.path.split(out_dir)
  try:
    names = os.listdir(parent or ".")
  except FileNotFoundError:
    return []
  return sorted(os.path.join(parent, n) for n in names if n.startswith(base + TMP_INFIX))


def _read_manifest_and_ids(path: str) -> tuple[dict, list[str], bytes]:
  """The manifest and ids of the cache folder `path`, checked against each other, and the
  manifest's bytes."""
  manifest_file = os.path.join(path, MANIFEST)
  raw = _file_bytes(manifest_file)
  manifest = json.loads(raw)
  if manifest.get("format") != FORMAT:
    raise CacheError(f"{manifest_file}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  ids_bytes = _file_bytes(os.path.join(path, IDS_FILE))
  ids = json.loads(ids_bytes)
  if len(ids) != manifest["num_examples"]:
    raise CacheError(f"{path}: {len(ids)} ids but manifest says {manifest['num_examples']}")
  # A cache written before the digest has none; its counts and record ids are still checked.
  if "ids_sha256" in manifest and _sha256(ids_bytes) != manifest["ids_sha256"]:
    raise CacheError(f"{path}: {IDS_FILE} does not match the manifest's ids_sha256")
  if sum(s["num_records"] for s in manifest["shards"]) != len(ids):
    raise CacheError(f"{path}: the manifest's shards hold other than {len(ids)} records")
  return manifest, ids, raw


def _record_head(reader, index: int, shard: str) -> tuple[str, str | None]:
  """``(id, writer token)`` of one record (no token in a cache written before tokens)."""
  try:
    rec = msgpack.unpackb(reader.read([index])[0])
    return rec["id"], rec.get("w")
  except Exception as e:  # a torn or foreign record
    raise CacheError(f"{shard}: record {index} is not a cache record ({e})") from e


def verify_records(path: str) -> dict:
  """Reads every record of the cache folder `path` and checks its id, in order, against
  ``ids.json`` and its size against the manifest; returns the manifest or raises CacheError.
  Writers run it before publishing; readers may run it on a copied cache."""
  manifest, ids, _ = _read_manifest_and_ids(path)
  row_bytes = int(manifest["dim"]) * _np_dtype(manifest["dtype"]).itemsize
  pos = 0
  for shard in manifest["shards"]:
    reader = ArrayRecordReader(os.path.join(path, shard["file"]))
    try:
      if reader.num_records() != shard["num_records"]:
        raise CacheError(
            f"{shard['file']} holds {reader.num_records()} records, "
            f"manifest says {shard['num_records']}"
        )
      for start in range(0, shard["num_records"], 256):
        stop = min(start + 256, shard["num_records"])
        for i, raw in enumerate(reader.read(start, stop), start):
          rec = msgpack.unpackb(raw)
          if (
              rec["id"] != ids[pos]
              or rec.get("w") != manifest.get("writer")
              or len(rec["emb"]) != int(rec["n"]) * row_bytes
          ):
            raise CacheError(
                f"{path}: record {i} of {shard['file']} has id {rec['id']!r}, writer "
                f"{rec.get('w')!r} and {len(rec['emb'])} bytes; {IDS_FILE} says {ids[pos]!r}, "
                f"the manifest writer {manifest.get('writer')!r} and {rec['n']} x {row_bytes} "
                "bytes"
            )
          pos += 1
    finally:
      reader.close()
  return manifest


class TextEmbeddingCache:
  """Read side: ``cache.get(id) -> (emb [L, D], mask [L])``; ``get_batch(ids)`` stacks them.

  Embeddings come back as float32 (``dtype="stored"`` keeps the stored dtype).
  """

  def __init__(self, path: str, dtype: str = "float32"):
    if paths.is_remote(path):  # ArrayRecord reads local files: a copy of the whole cache
      if not atomic.is_complete(path):
        raise CacheError(f"text embedding cache {path!r} does not exist (or is being uploaded)")
      path = paths.local_copy(path)
    path = os.path.normpath(path)
    self.path = path
    if TMP_INFIX in os.path.basename(path):
      raise CacheError(
          f"{path!r} is a writer's folder, not a published text embedding cache; open "
          f"{path.split(TMP_INFIX)[0]!r} once its writer has finished"
      )
    if not os.path.isdir(path):
      hint = ""
      if _temporaries(path):
        hint = (
            f" (writer folders {[os.path.basename(t) for t in _temporaries(path)]} exist: a "
            "writer is running or did not finish; wait for it or rerun write_cache)"
        )
      raise CacheError(f"text embedding cache {path!r} does not exist{hint}")
    if not os.path.isfile(os.path.join(path, MANIFEST)):
      raise CacheError(
          f"{path!r} is a half-written text embedding cache (no {MANIFEST}; "
          "the writer did not finish); rerun write_cache"
      )
    if dtype not in ("float32", "stored"):
      raise ValueError(f"dtype={dtype!r}; allowed: 'float32', 'stored'")
    self._readers, self._lock = [], threading.Lock()
    # A writer may swap in a new cache while this opens (overwrite=True): open again while the
    # manifest changes between the start and the end of opening (checks failed or not).
    manifest_file = os.path.join(path, MANIFEST)
    for _ in range(3):
      before = _file_bytes(manifest_file)
      try:
        if self._open(path) == before == _file_bytes(manifest_file):
          break
      except (CacheError, OSError):
        if _file_bytes(manifest_file) == before:
          raise
      self.close()
    else:
      raise CacheError(f"{path!r} was replaced by other writers three times while opening it")
    self.max_length = int(self.manifest["max_length"])
    self.dim = int(self.manifest["dim"])
    self._stored = _np_dtype(self.manifest["dtype"])
    self._out = np.dtype(np.float32) if dtype == "float32" else self._stored

  def _open(self, path: str) -> bytes:
    """Reads the manifest and ids, opens the shards and checks them; returns the manifest's
    bytes."""
    self.manifest, self.ids, raw = _read_manifest_and_ids(path)
    _np_dtype(self.manifest["dtype"])
    self._readers, self._where = [], {}
    for s, shard in enumerate(self.manifest["shards"]):
      reader = ArrayRecordReader(os.path.join(path, shard["file"]))
      self._readers.append(reader)
      count = shard["num_records"]
      if reader.num_records() != count:
        self.close()
        raise CacheError(
            f"{shard['file']} holds {reader.num_records()} records, manifest says {count}"
        )
      start = len(self._where)
      for i in range(count):
        self._where[self.ids[start + i]] = (s, i)
      # The ends of each shard against ids.json and the manifest's writer: records of another
      # writer under this manifest are refused here (every lookup checks its own record too).
      for i in sorted({0, count - 1}) if count else ():
        got = _record_head(reader, i, shard["file"])
        want = (self.ids[start + i], self.manifest.get("writer"))
        if got != want:
          self.close()
          raise CacheError(
              f"text embedding cache {path!r}: record {i} of {shard['file']} has (id, writer) "
              f"{got}, the manifest and {IDS_FILE} say {want}: they do not describe these "
              "records; rewrite it with write_cache(..., overwrite=True)"
          )
    return raw

  def __len__(self) -> int:
    return len(self.ids)

  def check_encoder(
      self, name: str, dim: int, max_length: int, fingerprint: str | None = None
  ) -> None:
    """Raises CacheError unless the cache was written by encoder `name` with this `dim` and
    `max_length` and, when given, these weights (`TextEncoder.fingerprint`; a cache from
    before fingerprints has none and fails this check): embeddings from another encoder
    would train silently wrong."""
    want = dict(encoder=name, dim=int(dim), max_length=int(max_length))
    if fingerprint is not None:
      want["fingerprint"] = fingerprint
    have = {k: self.manifest.get(k) for k in want}
    if have != want:
      bad = ", ".join(f"{k}={have[k]!r} (config: {want[k]!r})" for k in want if have[k] != want[k])
      raise CacheError(
          f"text embedding cache {self.path!r} does not match the text "
          f"encoder: {bad}; rewrite it with write_cache"
      )

  def __contains__(self, example_id) -> bool:
    return str(example_id) in self._where

  def get(self, example_id) -> tuple[np.ndarray, np.ndarray]:
    key = str(example_id)
    if key not in self._where:
      raise KeyError(f"example id {key!r} is not in the text embedding cache")
    shard, index = self._where[key]
    with self._lock:  # grain may call the lookup from its reader threads
      rec = msgpack.unpackb(self._readers[shard].read([index])[0])
    if rec["id"] != key or rec.get("w") != self.manifest.get("writer"):
      raise CacheError(
          f"record {index} of shard {shard} has (id, writer) ({rec['id']!r}, {rec.get('w')!r}), "
          f"expected ({key!r}, {self.manifest.get('writer')!r})"
      )
    n = int(rec["n"])
    emb = np.zeros((self.max_length, self.dim), self._out)
    emb[:n] = np.frombuffer(rec["emb"], self._stored).reshape(n, self.dim)
    return emb, np.arange(self.max_length) < n

  def get_batch(self, example_ids: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """``(emb [B, L, D], mask bool [B, L])`` for a batch of ids."""
    pairs = [self.get(i) for i in example_ids]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

  def close(self) -> None:
    for r in self._readers:
      r.close()
    self._readers = []
