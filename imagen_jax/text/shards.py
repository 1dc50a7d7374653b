"""Text embeddings of a prepared dataset (`data/records.py`), sharded like it, read by range.

The frozen T5 (§2.1) encodes each caption once, offline. For a dataset of record shards, the
embedding folder (local or `gs://`) holds one embedding shard per data shard, record j of it the
embedding of record j of the data shard (so a data record's embedding is found by the same
shard and index, and excluded records stay excluded)::

    embeddings.json       written last: format, encoder name + weights fingerprint, dim,
                          max_length, dtype, the dataset's manifest sha256, the shards
    shards/<stem>.rec     msgpack {"key", "n", "emb"}: the n valid token embeddings, [n, D]
    shards/<stem>.idx     byte offsets (records.py)
    shards/<stem>.json    the shard's marker: encoder fields, records, truncated captions

Only the valid tokens are stored: a caption of n tokens takes n * D * 2 bytes in bfloat16 (T5-XXL,
D = 4096: 8 KiB per token); the mask is `arange(L) < n` and padding is zero, as the encoder gives.

`precompute` encodes the data shards of one process (i mod process_count), skips a shard whose
marker exists and was written by the same encoder (resume after preemption), refuses one written
by another encoder with the reason, and writes the manifest once every shard is finished.
`EmbeddingShards(path, dataset).get_batch(indices)` reads, per host, only the embeddings of the
records it asks for (each a range read).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Sequence

import msgpack
import numpy as np

from imagen_jax import atomic, paths
from imagen_jax.data import records
from imagen_jax.text.cache_read import CacheError, _np_dtype

FORMAT = "imagen_jax.text_embedding_shards/v1"
MANIFEST = "embeddings.json"
_ENCODER_FIELDS = ("encoder", "fingerprint", "dim", "max_length", "dtype")


def is_shards(path: str) -> bool:
  """Whether `path` is an embedding-shards folder (its manifest exists)."""
  return (paths.path(path) / MANIFEST).exists()


def _encoder_fields(encoder, dtype: str) -> dict:
  return dict(
      encoder=encoder.name,
      fingerprint=encoder.fingerprint,
      dim=int(encoder.dim),
      max_length=int(encoder.max_length),
      dtype=dtype,
  )


def _dataset_digest(dataset_root: str) -> str:
  return hashlib.sha256((paths.path(dataset_root) / records.MANIFEST).read_bytes()).hexdigest()


def _mismatch(have: dict, want: dict) -> str:
  return ", ".join(
      f"{k}={have.get(k)!r} (this encoder: {want[k]!r})" for k in want if have.get(k) != want[k]
  )


def encode_shard(encoder, captions: Sequence[str], keys: Sequence[str], *, batch_size: int, dtype):
  """Packed embedding records of `captions` (one compiled batch shape; the last batch padded)
  and the number of captions the tokenizer truncated."""
  store = _np_dtype(dtype)
  out, truncated = [], 0
  for start in range(0, len(captions), batch_size):
    texts = list(captions[start : start + batch_size])
    n_real = len(texts)
    texts += [""] * (batch_size - n_real)
    emb, mask = encoder.encode(texts)
    truncated += int(getattr(encoder.tokenizer, "last_num_truncated", 0))
    emb, mask = np.asarray(emb), np.asarray(mask)
    for row in range(n_real):
      n = int(mask[row].sum())
      if not mask[row, :n].all():
        raise CacheError(f"mask of {keys[start + row]!r} is not a prefix; cannot store it")
      payload = np.ascontiguousarray(emb[row, :n].astype(store)).tobytes()
      out.append(msgpack.packb({"key": keys[start + row], "n": n, "emb": payload}))
  return out, truncated


def precompute(
    encoder,
    dataset_root: str,
    out: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    batch_size: int = 64,
    dtype: str = "bfloat16",
) -> dict | None:
  """Encodes this process's shards of the prepared dataset into `out` (resumable); returns the
  manifest once every shard is finished (None before). Raises CacheError for a shard of `out`
  written by another encoder."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
  _np_dtype(dtype)
  data = records.RecordSource(dataset_root)
  want = _encoder_fields(encoder, dtype)
  stems = [s["stem"] for s in data.manifest["shards"]]
  for i, shard in enumerate(data.manifest["shards"]):
    if i % process_count != process_index:
      continue
    stem = shard["stem"]
    have = records.read_shard_report(out, stem)
    if have is not None:
      if any(have.get(k) != want[k] for k in want):
        raise CacheError(
            f"{out}: embedding shard {stem} was written by another encoder: "
            f"{_mismatch(have, want)}; remove it or write to another folder"
        )
      continue  # finished by an earlier run
    text = records.read_shard_text(dataset_root, stem)
    if len(text["captions"]) != shard["num_records"]:
      raise CacheError(
          f"{dataset_root}: shard {stem} lists other than {shard['num_records']} captions"
      )
    recs, truncated = encode_shard(
        encoder, text["captions"], text["keys"], batch_size=batch_size, dtype=dtype
    )
    records.write_shard(out, stem, recs, dict(want, num_truncated=truncated))
    logging.info("text shards: %s: %d captions encoded", stem, len(recs))
  if set(stems) - records.finished_stems(out):  # one listing, before reading any report
    return None
  reports = [records.read_shard_report(out, s) for s in stems]
  if any(r is None for r in reports):
    return None
  for stem, rep in zip(stems, reports):
    if any(rep.get(k) != want[k] for k in want):
      raise CacheError(
          f"{out}: embedding shard {stem} is from another encoder: {_mismatch(rep, want)}"
      )
  manifest = dict(
      format=FORMAT,
      **want,
      dataset_sha256=_dataset_digest(dataset_root),
      num_truncated=sum(r["num_truncated"] for r in reports),
      shards=[dict(stem=s, num_records=r["num_records"]) for s, r in zip(stems, reports)],
  )
  atomic.write_json(paths.join(out, MANIFEST), manifest, indent=1)
  return manifest


class EmbeddingShards:
  """Read side: `get_batch(indices) -> (emb float32 [B, L, D], mask bool [B, L])` for records
  `indices` of `dataset` (a `records.RecordSource`); reads only those records' embeddings."""

  def __init__(self, path: str, dataset: records.RecordSource):
    self.path = path
    self._dataset = dataset
    self._reader = records.RecordSource(path, manifest=MANIFEST, fmt=FORMAT)
    self.manifest = self._reader.manifest
    if self.manifest["dataset_sha256"] != _dataset_digest(dataset.root):
      raise CacheError(
          f"{path}: embeddings of another dataset (its dataset.json differs from "
          f"{dataset.root}'s); precompute them for this one"
      )
    self.max_length = int(self.manifest["max_length"])
    self.dim = int(self.manifest["dim"])
    self._stored = _np_dtype(self.manifest["dtype"])
    self.stats = self._reader.stats

  def __len__(self) -> int:
    return len(self._dataset)

  def check_encoder(self, name, dim, max_length, fingerprint=None) -> None:
    """Raises CacheError unless these embeddings came from this encoder (and weights)."""
    want = dict(encoder=name, dim=int(dim), max_length=int(max_length))
    if fingerprint is not None:
      want["fingerprint"] = fingerprint
    if any(self.manifest.get(k) != v for k, v in want.items()):
      raise CacheError(
          f"text embeddings {self.path!r} do not match the text encoder: "
          f"{_mismatch(self.manifest, want).replace('this encoder', 'config')}; precompute them "
          "with this encoder"
      )

  def get(self, index) -> tuple[np.ndarray, np.ndarray]:
    s, r = self._dataset.locate(int(index))
    rec = self._reader.read_at(s, r)
    n = int(rec["n"])
    emb = np.zeros((self.max_length, self.dim), np.float32)
    emb[:n] = np.frombuffer(rec["emb"], self._stored).reshape(n, self.dim)
    return emb, np.arange(self.max_length) < n

  def get_batch(self, indices: Sequence) -> tuple[np.ndarray, np.ndarray]:
    pairs = [self.get(i) for i in indices]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
