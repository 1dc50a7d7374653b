"""Precomputed text embeddings for training: write once with the frozen encoder, read by id.

Imagen's T5-XXL encoder is frozen (§2.1), so each caption's embedding ``[L, D]`` can be computed
once and stored (a 4096-dim T5-XXL embedding of 128 tokens is 1 MiB in bfloat16; only real
tokens are stored, so typical captions take a fraction of that).

Layout of a cache directory::

    manifest.json                     written last: format, encoder + weights fingerprint, dim,
                                      max_length, dtype, counts per shard, sha256 of ids.json and
                                      of the sorted (id, caption) pairs (the completion marker)
    ids.json                          example ids in record order
    embeddings-00000.array_record     one record per example (group_size 1: random access)

A record is msgpack ``{"id": str, "n": int, "emb": bytes, "w": str}``: the first ``n`` token
embeddings (row-major ``[n, D]`` in the manifest's dtype, float32 or bfloat16) and the writer's
random token, also in the manifest as ``writer`` (records from another writer are refused). The
mask is ``arange(L) < n`` (our tokenizers pad at the end) and embeddings at padding are zero, as
the encoder returns them.
No pickle anywhere.

Several writers (processes, or hosts sharing a file system with ``flock``) may write one cache:

- Each writer encodes into its own folder ``<dir>.incomplete-XXXXXXXX`` beside the cache (a
  unique name) and holds an ``flock`` on ``.writer.lock`` inside it while it lives. No writer
  deletes another's folder: only a folder whose writer lock is free (its writer died; the lock
  goes with the process) is removed, by a later writer, under the cache lock.
- ``<dir>.lock`` beside the cache (never deleted) is locked briefly to create a writer's folder,
  to remove dead writers' folders and to publish.
- Before publishing, the writer reads its records back and checks their ids, in order, against
  ``ids.json`` and the manifest's counts and digest; a mismatch is an error, nothing published.
- Publishing, under the cache lock: no cache yet -> the folder is renamed to ``<dir>``. A cache
  of the same content (encoder name, weights fingerprint, dim, max_length, dtype and the
  (id, caption) pairs) -> it is kept and returned, this writer's folder dropped. A cache of other
  content -> ``overwrite=False`` raises ``CacheError`` (this writer's folder dropped);
  ``overwrite=True`` swaps this writer's folder in atomically (``atomic.replace_dir``). A reader
  sees no cache or one whole cache written by one writer, never a mix.
- ``write_cache`` with ``overwrite=False`` returns an existing cache of the same content without
  encoding anything and refuses one of other content before encoding.
- ``ensure_cache`` holds the cache lock for its whole check-encode-publish, so concurrent builders
  of one cache encode once (the others wait, then reuse it); it writes the union of the wanted
  captions and those already cached with the same weights, so no caller loses its captions.
- Readers take no lock. On open they check the format, ``ids.json`` against the manifest's count
  and digest, each shard's record count and the ids of each shard's first and last records;
  every lookup checks its record's id; ``verify_records`` reads every record. A mismatch is
  refused with a ``CacheError``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from typing import Hashable, Iterable, Sequence

import msgpack
import numpy as np

from imagen_jax import atomic, paths

FORMAT = "imagen_jax.text_embedding_cache/v1"
MANIFEST = "manifest.json"
IDS_FILE = "ids.json"
TMP_INFIX = ".incomplete-"  # a writer's folder: <dir>.incomplete-XXXXXXXX
LOCK_SUFFIX = ".lock"  # the cache lock: <dir>.lock
WRITER_LOCK = ".writer.lock"  # held by a live writer, inside its folder
_DTYPES = ("float32", "bfloat16")
# The manifest fields that define what a cache holds: equal fields, the same cache.
_CONTENT = ("encoder", "fingerprint", "dim", "max_length", "dtype", "examples_sha256")


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


def _file_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _examples_digest(examples: Sequence[tuple[str, str]]) -> str:
  """sha256 of the sorted (id, caption) pairs: the same pairs in any order give one digest."""
  return _sha256(json.dumps(sorted(examples), ensure_ascii=False).encode())


def _checked_examples(examples: Iterable[tuple[Hashable, str]]) -> list[tuple[str, str]]:
  """``[(str(id), caption)]``; refuses duplicate ids and captions that are not str."""
  out, seen = [], set()
  for example_id, caption in examples:
    key = str(example_id)
    if key in seen:
      raise CacheError(f"duplicate example id {key!r}; ids must be unique")
    if not isinstance(caption, str):
      raise CacheError(f"caption of example {key!r} is a {type(caption).__name__}; must be a str")
    seen.add(key)
    out.append((key, caption))
  return out


@contextlib.contextmanager
def _locked(out_dir: str, held: bool = False):
  """Holds the cache lock ``<out_dir>.lock`` (exclusive ``flock``) for the block. `held`: the
  caller holds it already (one process locking twice through two opens would wait on itself)."""
  if held:
    yield
    return
  parent = os.path.dirname(out_dir)
  os.makedirs(parent or ".", exist_ok=True)
  fd = os.open(out_dir + LOCK_SUFFIX, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock


def _temporaries(out_dir: str) -> list[str]:
  """The writers' folders of the cache at `out_dir`, live or dead."""
  parent, base = os.path.split(out_dir)
  try:
    names = os.listdir(parent or ".")
  except FileNotFoundError:
    return []
  return sorted(os.path.join(parent, n) for n in names if n.startswith(base + TMP_INFIX))


def _remove_dead_temporaries(out_dir: str) -> None:
  """Removes the folders of dead writers of `out_dir`; the caller holds the cache lock.

  A writer's folder and its lock file are made under the cache lock, and the lock file is removed
  only under it (just before publishing), so a folder whose lock file is absent or free has no
  live writer.
  """
  for tmp in _temporaries(out_dir):
    try:
      fd = os.open(os.path.join(tmp, WRITER_LOCK), os.O_RDWR)
    except FileNotFoundError:
      fd = None
    except NotADirectoryError:
      continue
    try:
      if fd is not None:
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          continue  # its writer is alive
      logging.warning("removing %s, left by a writer that did not finish", tmp)
      shutil.rmtree(tmp, ignore_errors=True)
    finally:
      if fd is not None:
        os.close(fd)


def _new_temporary(out_dir: str, lock_held: bool) -> tuple[str, int]:
  """A fresh writer's folder beside `out_dir`, and the fd holding its writer lock."""
  parent, base = os.path.split(out_dir)
  with _locked(out_dir, lock_held):
    _remove_dead_temporaries(out_dir)
    tmp = tempfile.mkdtemp(prefix=base + TMP_INFIX, dir=parent or ".")
    fd = os.open(os.path.join(tmp, WRITER_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: never contended
  return tmp, fd


def _same_content(a: dict, b: dict) -> bool:
  return a.get("examples_sha256") is not None and all(a.get(k) == b.get(k) for k in _CONTENT)


def _published_manifest(out_dir: str) -> dict | None:
  """The manifest of the whole cache at `out_dir`; None if nothing is there; CacheError if what
  is there is not a whole, consistent cache."""
  if not os.path.exists(out_dir):
    return None
  existing = TextEmbeddingCache(out_dir)
  existing.close()
  return existing.manifest


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
    _keyed_by: str = "id",
    _lock_held: bool = False,
) -> dict:
  """Encodes ``(example_id, caption)`` pairs with ``encoder`` and writes a cache to ``out_dir``.

  Safe with several writers on one ``out_dir`` (module docstring): each encodes into its own
  folder and publishes atomically under a lock; a cache of the same content is reused.

  Args:
    encoder: a ``registry.TextEncoder`` (``tokenize`` + ``encode_tokens``).
    examples: iterable of ``(id, caption)``; ids (str or int) must be unique; they are stored
      as ``str(id)``; captions must be str.
    dtype: storage dtype, "float32" or "bfloat16" (halves the size).
    batch_size: captions per encoder call (one compiled shape; the last batch is padded).
    records_per_shard: records per array_record file.
    overwrite: always encode, and replace whatever cache is at ``out_dir`` (atomically).
      Without it, a cache of the same content is returned as it is and one of other content
      raises CacheError.
    _keyed_by: "caption" marks a cache whose ids are its captions (`ensure_cache`).
    _lock_held: the caller holds the cache lock (`ensure_cache`).
  Returns:
    the manifest dict of the cache at ``out_dir``.
  """
  out_dir = os.path.normpath(out_dir)
  _np_dtype(dtype)  # a bad dtype fails before anything is written
  examples = _checked_examples(examples)
  want = dict(
      encoder=encoder.name,
      fingerprint=encoder.fingerprint,
      dim=int(encoder.dim),
      max_length=int(encoder.max_length),
      dtype=dtype,
      examples_sha256=_examples_digest(examples),
  )
  if not overwrite:
    existing = _existing_or_refuse(out_dir, want)
    if existing is not None:
      return existing
  tmp, writer_lock = _new_temporary(out_dir, _lock_held)
  published = False
  try:
    manifest = _write_records(
        encoder,
        examples,
        tmp,
        name=os.path.basename(out_dir),
        dtype=dtype,
        batch_size=batch_size,
        records_per_shard=records_per_shard,
        progress=progress,
        content=dict(want, keyed_by=_keyed_by),
    )
    verify_records(tmp)  # what is on disk matches the manifest, before anyone can see it
    with _locked(out_dir, _lock_held):
      os.remove(os.path.join(tmp, WRITER_LOCK))  # under the cache lock: never seen lockless
      if not overwrite:
        existing = _existing_or_refuse(out_dir, manifest, " while this writer was encoding")
        if existing is not None:
          logging.info("%s was published meanwhile with the same content; reusing it", out_dir)
          return existing
      atomic.replace_dir(tmp, out_dir)
      published = True
      return manifest
  finally:
    os.close(writer_lock)
    if not published:
      shutil.rmtree(tmp, ignore_errors=True)


def _existing_or_refuse(out_dir: str, want: dict, when: str = "") -> dict | None:
  """The manifest of a cache of content `want` at `out_dir`, or None if none is there; raises
  CacheError if something else is there."""
  try:
    existing = _published_manifest(out_dir)
  except CacheError as e:
    raise CacheError(
        f"{out_dir!r} exists{when} but is not a whole cache ({e}); pass overwrite=True to "
        "replace it"
    ) from e
  if existing is None or _same_content(existing, want):
    return existing
  diff = ", ".join(
      f"{k}={existing.get(k)!r} (this writer: {want[k]!r})"
      for k in _CONTENT
      if existing.get(k) != want[k]
  )
  raise CacheError(
      f"a cache of other content is already at {out_dir!r}: {diff}{when}; pass overwrite=True "
      "to replace it, or write to another directory"
  )


def _write_records(
    encoder, examples, tmp: str, *, name, dtype, batch_size, records_per_shard, progress, content
) -> dict:
  """Encodes every example and writes the records, ids.json and the manifest into `tmp`."""
  import jax
  from array_record.python.array_record_module import ArrayRecordWriter

  store = _np_dtype(dtype)
  token = uuid.uuid4().hex  # ties every record to this writer's manifest
  encode = jax.jit(encoder.encode_tokens)
  ids_written: list[str] = []
  shard_counts: list[int] = []
  writer = None
  truncated = 0
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(desc=f"text cache -> {name}", unit="caption", total=len(examples))

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
      writer.write(msgpack.packb({"id": key, "n": n, "emb": payload, "w": token}))
      shard_counts[-1] += 1
      ids_written.append(key)
    if bar is not None:
      bar.update(len(keys))

  try:
    for start in range(0, len(examples), batch_size):
      flush(examples[start : start + batch_size])
  finally:
    if writer is not None:
      writer.close()
    if bar is not None:
      bar.close()

  ids_bytes = json.dumps(ids_written).encode()
  manifest = dict(
      format=FORMAT,
      **content,
      num_examples=len(ids_written),
      num_truncated=int(truncated),
      writer=token,
      ids_sha256=_sha256(ids_bytes),
      shards=[dict(file=_shard_name(i), num_records=c) for i, c in enumerate(shard_counts)],
  )
  atomic.write_bytes(os.path.join(tmp, IDS_FILE), ids_bytes)
  atomic.write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
  return manifest


def ensure_cache(encoder, captions: Sequence[str], out_dir: str, **write_kwargs) -> str:
  """A cache keyed by the caption text itself holding every one of `captions`; returns out_dir.

  Reuses a whole cache at `out_dir` keyed by caption and written with the same encoder weights
  (fingerprint) that holds every caption; otherwise writes one holding `captions` and the
  captions such a cache already holds (kwargs passed on to `write_cache`). The cache lock is held
  throughout, so concurrent callers encode once.

  A bucket `out_dir` (`gs://`): the cache is made in its local copy (`paths.local_copy`) and,
  when anything was written, uploaded with the marker last (`atomic.upload_dir`); the lock is
  then per machine, so hosts without a shared file system each encode the same captions.
  """
  if paths.is_remote(out_dir):
    local = paths.local_copy(out_dir, missing_ok=True)
    before = _published_manifest(local) if os.path.exists(os.path.join(local, MANIFEST)) else None
    ensure_cache(encoder, captions, local, **write_kwargs)
    if _published_manifest(local) != before or not atomic.is_complete(out_dir):
      atomic.upload_dir(local, out_dir)
    return out_dir
  out_dir = os.path.normpath(out_dir)
  wanted = set(captions)
  if _cached_captions(encoder, out_dir) >= wanted:  # the common case takes no lock
    return out_dir
  with _locked(out_dir):
    have = _cached_captions(encoder, out_dir)
    if have >= wanted:  # another process wrote it while this one waited
      return out_dir
    todo = sorted(wanted | have)
    logging.info("encoding %d distinct captions once -> %s", len(todo), out_dir)
    write_cache(
        encoder,
        [(c, c) for c in todo],
        out_dir,
        overwrite=True,
        _keyed_by="caption",
        _lock_held=True,
        **write_kwargs,
    )
  return out_dir


def _cached_captions(encoder, out_dir: str) -> set[str]:
  """The captions of a whole caption-keyed cache at `out_dir` written with `encoder`'s weights;
  empty if there is none (or it is broken, or of other weights)."""
  if not os.path.exists(os.path.join(out_dir, MANIFEST)):
    return set()
  try:
    existing = TextEmbeddingCache(out_dir)
  except CacheError as e:
    logging.warning("rewriting %s: %s", out_dir, e)
    return set()
  existing.close()
  m = existing.manifest
  if m.get("keyed_by") != "caption" or m.get("fingerprint") != encoder.fingerprint:
    return set()
  return set(existing.ids)


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
  from array_record.python.array_record_module import ArrayRecordReader

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
    from array_record.python.array_record_module import ArrayRecordReader

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
