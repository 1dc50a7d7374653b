"""Precomputed text embeddings for training: write once with the frozen encoder, read by id.

Imagen's T5-XXL encoder is frozen (§2.1), so each caption's embedding ``[L, D]`` can be computed
once and stored (a 4096-dim T5-XXL embedding of 128 tokens is 1 MiB in bfloat16; only real
tokens are stored, so typical captions take a fraction of that).

Layout of a cache directory::

    manifest.json                     written last: format, encoder, dim, max_length, dtype,
                                      counts per shard (the completion marker)
    ids.json                          example ids in record order
    embeddings-00000.array_record     one record per example (group_size 1: random access)

A record is msgpack ``{"id": str, "n": int, "emb": bytes}``: the first ``n`` token embeddings
(row-major ``[n, D]`` in the manifest's dtype, float32 or bfloat16); the mask is ``arange(L) < n``
(our tokenizers pad at the end) and embeddings at padding are zero, as the encoder returns them.
No pickle anywhere. Writing goes to ``<dir>.incomplete`` and is renamed to ``<dir>`` only after
every record and the manifest are on disk, so a half-written cache is never mistaken for a
finished one; a directory without the manifest is refused with a clear error.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Hashable, Iterable, Sequence

import msgpack
import numpy as np

from imagen_jax import atomic

FORMAT = "imagen_jax.text_embedding_cache/v1"
MANIFEST = "manifest.json"
IDS_FILE = "ids.json"
INCOMPLETE_SUFFIX = ".incomplete"
_DTYPES = ("float32", "bfloat16")


class CacheError(RuntimeError):
  """The cache directory is missing, half-written or inconsistent."""


def _np_dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f"cache dtype {name!r}; allowed: {_DTYPES}")
  if name == "bfloat16":
    import ml_dtypes  # ships with jax

    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(np.float32)


def _shard_name(i: int) -> str:
  return f"embeddings-{i:05d}.array_record"


def write_cache(
    encoder,
    examples: Iterable[tuple[Hashable, str]],
    out_dir: str,
    *,
    dtype: str = "float32",
    batch_size: int = 64,
    records_per_shard: int = 100_000,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
  """Encodes ``(example_id, caption)`` pairs with ``encoder`` and writes a cache to ``out_dir``.

  Args:
    encoder: a ``registry.TextEncoder`` (``tokenize`` + ``encode_tokens``).
    examples: iterable of ``(id, caption)``; ids (str or int) must be unique; they are stored
      as ``str(id)``.
    dtype: storage dtype, "float32" or "bfloat16" (halves the size).
    batch_size: captions per encoder call (one compiled shape; the last batch is padded).
    records_per_shard: records per array_record file.
    overwrite: replace an existing finished cache at ``out_dir``.
  Returns:
    the manifest dict.
  """
  out_dir = os.path.normpath(out_dir)
  _np_dtype(dtype)  # a bad dtype fails before anything is written
  if os.path.exists(out_dir) and not overwrite:
    raise CacheError(f"{out_dir!r} already exists; pass overwrite=True to replace it")
  incomplete = out_dir + INCOMPLETE_SUFFIX
  if os.path.exists(incomplete):
    logging.warning("removing a half-written cache left at %s", incomplete)
  with atomic.publish_dir(out_dir, overwrite=True, tmp=incomplete) as tmp:
    return _write_records(
        encoder,
        examples,
        tmp,
        name=os.path.basename(out_dir),
        dtype=dtype,
        batch_size=batch_size,
        records_per_shard=records_per_shard,
        progress=progress,
    )


def _write_records(
    encoder, examples, tmp: str, *, name, dtype, batch_size, records_per_shard, progress
) -> dict:
  """Encodes every example and writes the records, ids.json and the manifest into `tmp`."""
  import jax
  from array_record.python.array_record_module import ArrayRecordWriter

  store = _np_dtype(dtype)
  encode = jax.jit(encoder.encode_tokens)
  ids_written: list[str] = []
  seen: set[str] = set()
  shard_counts: list[int] = []
  writer = None
  truncated = 0
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(
        desc=f"text cache -> {name}",
        unit="caption",
        total=len(examples) if hasattr(examples, "__len__") else None,
    )

  def flush(batch):
    nonlocal writer, truncated
    keys = [k for k, _ in batch]
    texts = [t for _, t in batch]
    texts += [""] * (batch_size - len(texts))  # one compiled shape for every batch
    ids, mask = encoder.tokenize(texts)
    truncated += encoder.tokenizer.last_num_truncated
    emb = np.asarray(encode(encoder.params, ids, mask))
    for row, key in enumerate(keys):
      n = int(mask[row].sum())
      if not mask[row, :n].all():
        raise CacheError(f"mask of example {key!r} is not a prefix; cannot store it")
      if writer is None or shard_counts[-1] >= records_per_shard:
        if writer is not None:
          writer.close()
        shard_counts.append(0)
        writer = ArrayRecordWriter(
            os.path.join(tmp, _shard_name(len(shard_counts) - 1)), "group_size:1"
        )
      payload = np.ascontiguousarray(emb[row, :n].astype(store)).tobytes()
      writer.write(msgpack.packb({"id": key, "n": n, "emb": payload}))
      shard_counts[-1] += 1
      ids_written.append(key)
    if bar is not None:
      bar.update(len(keys))

  batch: list[tuple[str, str]] = []
  try:
    for example_id, caption in examples:
      key = str(example_id)
      if key in seen:
        raise CacheError(f"duplicate example id {key!r}; ids must be unique")
      seen.add(key)
      batch.append((key, caption))
      if len(batch) == batch_size:
        flush(batch)
        batch = []
    if batch:
      flush(batch)
  finally:
    if writer is not None:
      writer.close()
    if bar is not None:
      bar.close()

  manifest = dict(
      format=FORMAT,
      encoder=encoder.name,
      fingerprint=encoder.fingerprint,
      dim=int(encoder.dim),
      max_length=int(encoder.max_length),
      dtype=dtype,
      num_examples=len(ids_written),
      num_truncated=int(truncated),
      shards=[dict(file=_shard_name(i), num_records=c) for i, c in enumerate(shard_counts)],
  )
  atomic.write_text(os.path.join(tmp, IDS_FILE), json.dumps(ids_written))
  atomic.write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
  return manifest


def ensure_cache(encoder, captions: Sequence[str], out_dir: str, **write_kwargs) -> str:
  """A cache keyed by the caption text itself holding every one of `captions`; returns out_dir.

  Reuses a finished cache at `out_dir` written by the same encoder weights (fingerprint) that
  holds every caption; otherwise (re)writes it with `write_cache` (kwargs passed on).
  """
  wanted = sorted(set(captions))
  if os.path.exists(os.path.join(out_dir, MANIFEST)):
    existing = TextEmbeddingCache(out_dir)
    try:
      reusable = existing.manifest.get("fingerprint") == encoder.fingerprint and all(
          c in existing for c in wanted
      )
    finally:
      existing.close()
    if reusable:
      return out_dir
  logging.info("encoding %d distinct captions once -> %s", len(wanted), out_dir)
  write_cache(encoder, [(c, c) for c in wanted], out_dir, overwrite=True, **write_kwargs)
  return out_dir


class TextEmbeddingCache:
  """Read side: ``cache.get(id) -> (emb [L, D], mask [L])``; ``get_batch(ids)`` stacks them.

  Embeddings come back as float32 (``dtype="stored"`` keeps the stored dtype).
  """

  def __init__(self, path: str, dtype: str = "float32"):
    from array_record.python.array_record_module import ArrayRecordReader

    path = os.path.normpath(path)
    self.path = path
    manifest_file = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
      hint = ""
      if os.path.exists(path + INCOMPLETE_SUFFIX):
        hint = (
            f" (a half-written {path + INCOMPLETE_SUFFIX!r} exists: the writer did "
            "not finish; rerun write_cache)"
        )
      raise CacheError(f"text embedding cache {path!r} does not exist{hint}")
    if path.endswith(INCOMPLETE_SUFFIX) or not os.path.isfile(manifest_file):
      raise CacheError(
          f"{path!r} is a half-written text embedding cache (no {MANIFEST}; "
          "the writer did not finish); rerun write_cache"
      )
    with open(manifest_file) as f:
      self.manifest = json.load(f)
    if self.manifest.get("format") != FORMAT:
      raise CacheError(
          f"{manifest_file}: format {self.manifest.get('format')!r}, " f"expected {FORMAT!r}"
      )
    with open(os.path.join(path, IDS_FILE)) as f:
      self.ids: list[str] = json.load(f)
    if len(self.ids) != self.manifest["num_examples"]:
      raise CacheError(
          f"{path}: {len(self.ids)} ids but manifest says " f"{self.manifest['num_examples']}"
      )
    self.max_length = int(self.manifest["max_length"])
    self.dim = int(self.manifest["dim"])
    self._stored = _np_dtype(self.manifest["dtype"])
    if dtype not in ("float32", "stored"):
      raise ValueError(f"dtype={dtype!r}; allowed: 'float32', 'stored'")
    self._out = np.dtype(np.float32) if dtype == "float32" else self._stored
    self._readers, self._where = [], {}
    self._lock = threading.Lock()
    for s, shard in enumerate(self.manifest["shards"]):
      reader = ArrayRecordReader(os.path.join(path, shard["file"]))
      if reader.num_records() != shard["num_records"]:
        raise CacheError(
            f"{shard['file']} holds {reader.num_records()} records, "
            f"manifest says {shard['num_records']}"
        )
      start = len(self._where)
      for i in range(shard["num_records"]):
        self._where[self.ids[start + i]] = (s, i)
      self._readers.append(reader)

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
    if rec["id"] != key:
      raise CacheError(
          f"record {index} of shard {shard} has id {rec['id']!r}, " f"expected {key!r}"
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
