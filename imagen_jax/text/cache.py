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
import json
import logging
import os
import shutil
import tempfile
import uuid
from typing import Hashable, Iterable, Sequence

import jax
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm.auto import tqdm

from imagen_jax import atomic, paths

# The read side and the format's names, re-exported: ``cache.TextEmbeddingCache`` etc.
from imagen_jax.text.cache_read import (  # noqa: F401
    FORMAT,
    IDS_FILE,
    MANIFEST,
    TMP_INFIX,
    CacheError,
    TextEmbeddingCache,
    _file_bytes,
    _np_dtype,
    _sha256,
    _shard_name,
    _temporaries,
    verify_records,
)

LOCK_SUFFIX = ".lock"  # the cache lock: <dir>.lock
WRITER_LOCK = ".writer.lock"  # held by a live writer, inside its folder
# The manifest fields that define what a cache holds: equal fields, the same cache.
_CONTENT = ("encoder", "fingerprint", "dim", "max_length", "dtype", "examples_sha256")


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
    os.chmod(tmp, atomic.DIR_MODE)  # the published cache: readable as a makedirs folder is
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
  store = _np_dtype(dtype)
  token = uuid.uuid4().hex  # ties every record to this writer's manifest
  encode = jax.jit(encoder.encode_tokens)
  ids_written: list[str] = []
  shard_counts: list[int] = []
  writer = None
  truncated = 0
  bar = None
  if progress:
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
