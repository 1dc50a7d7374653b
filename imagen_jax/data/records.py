"""Record shards read by range requests: the random-access dataset form for a bucket.

A prepared dataset is a folder (local, `gs://`, or a gcsfuse mount) of shards and a manifest::

    dataset.json          written last (the completion marker): format, shards, counts, report
    shards/<stem>.rec     the records of one shard, concatenated (msgpack, no framing)
    shards/<stem>.idx     uint64 little-endian byte offsets [n + 1] of the records in .rec
    shards/<stem>.text.json  {"keys", "captions"} of its records in order (for the text encoder)
    shards/<stem>.json    that shard's report; written after the others (the shard's marker)

A record is msgpack `{"key": str, "image": bytes, "caption": str, "json": str}`: the image file
as prepared (an upright RGB JPEG byte for byte, anything else lossless PNG), the caption, the
source's metadata. `RecordSource[i]` reads record i with two range reads at most (an index block
of `INDEX_BLOCK` offsets, cached, then the record's own bytes): a host reads the records of its
slice of the global stream and nothing else; no host ever holds the dataset. The manifest may
exclude records of a shard (`excluded`: raw indices, a duplicate key found across shards); they
are left out of the numbering, never read.

Why not ArrayRecord on the bucket: its reader (C++ riegeli) opens local files only, so a bucket
needs a FUSE mount; this format needs none (fsspec range reads, the same code on a local path or
a mount) and lets the tests count every byte each host reads (`RecordSource.stats`).
"""

from __future__ import annotations

import bisect
import collections
import json
import os
import threading
from typing import Any

import fsspec.core
import msgpack
import numpy as np

from imagen_jax import atomic, paths
from imagen_jax.data import decode

FORMAT = "imagen_jax.records/v1"
MANIFEST = "dataset.json"
SHARDS = "shards"
INDEX_BLOCK = 1024  # offsets per index read (8 KiB)
INDEX_CACHE_BLOCKS = 4096  # index blocks kept per source (32 MiB at most)
TRACKED = 100_000  # record indices kept in RecordSource.stats (for tests and diagnostics)


def shard_files(root: str, stem: str) -> dict[str, str]:
  """The paths of shard `stem`'s files under dataset folder `root`."""
  base = paths.join(root, SHARDS, stem)
  return {
      "rec": base + ".rec",
      "idx": base + ".idx",
      "text": base + ".text.json",
      "report": base + ".json",
  }


def pack_record(key: str, image: bytes, caption: str, meta: str = "") -> bytes:
  return msgpack.packb({"key": key, "image": image, "caption": caption, "json": meta})


def write_shard(
    root: str, stem: str, records: list[bytes], report: dict, text: dict | None = None
) -> None:
  """Writes shard `stem` (packed records, in order), its `text` sidecar ({"keys", "captions"})
  and its report, the report last: a shard whose report exists is whole (each file is written
  atomically, `atomic.write_bytes`)."""
  files = shard_files(root, stem)
  paths.makedirs(paths.join(root, SHARDS))
  offsets = np.zeros(len(records) + 1, "<u8")
  np.cumsum([len(r) for r in records], out=offsets[1:])
  atomic.write_bytes(files["rec"], b"".join(records))
  atomic.write_bytes(files["idx"], offsets.tobytes())
  if text is not None:
    atomic.write_json(files["text"], text, indent=None)
  atomic.write_json(files["report"], dict(report, num_records=len(records), bytes=int(offsets[-1])))


def read_shard_text(root: str, stem: str) -> dict:
  """Shard `stem`'s {"keys", "captions"} (record order)."""
  return json.loads(paths.path(shard_files(root, stem)["text"]).read_text())


def finished_stems(root: str) -> set[str]:
  """The stems of the shards under `root` whose report exists (one listing of the folder)."""
  folder = paths.path(root) / SHARDS
  if not folder.exists():
    return set()
  names = [p.name for p in folder.iterdir()]
  return {n[: -len(".json")] for n in names if n.endswith(".json") and not n.endswith(".text.json")}


def read_shard_report(root: str, stem: str) -> dict | None:
  """Shard `stem`'s report, or None while the shard is unfinished (no report object yet)."""
  p = paths.path(shard_files(root, stem)["report"])
  return json.loads(p.read_text()) if p.exists() else None


class RecordSource:
  """grain data source of a prepared dataset: `len()` and `[i] -> {"image": uint8 [H, W, 3],
  "caption": str, "key": str, "index": i}`; `decode_images=False` keeps the image bytes.

  stats: {"bytes": bytes read, "requests": range reads, "record_bytes": bytes of records,
  "objects": names of the objects read, "indices": the last `TRACKED` records read} of this
  source (this process) since it was opened.
  """

  def __init__(
      self, root: str, *, decode_images: bool = True, manifest: str = MANIFEST, fmt: str = FORMAT
  ):
    self.root = os.fspath(root).rstrip("/")
    self._decode = decode_images
    self._fs, _ = fsspec.core.url_to_fs(self.root)
    self._lock, self._index_lock = threading.Lock(), threading.Lock()
    self._blocks: collections.OrderedDict = collections.OrderedDict()
    self.stats = {
        "bytes": 0,
        "requests": 0,
        "record_bytes": 0,
        "objects": set(),
        "indices": collections.deque(maxlen=TRACKED),  # bounded: a run reads billions
    }
    marker = paths.path(self.root) / manifest
    if not marker.exists():
      raise FileNotFoundError(
          f"{self.root}: no {manifest}; not a prepared folder, or its preparation has not "
          "finished (it is written last)"
      )
    raw = marker.read_bytes()
    self._count(manifest, len(raw))
    self.manifest = json.loads(raw)
    if self.manifest.get("format") != fmt:
      raise ValueError(
          f"{self.root}/{manifest}: format {self.manifest.get('format')!r}, expected {fmt!r}"
      )
    self._shards = self.manifest["shards"]
    kept = [s["num_records"] - len(s.get("excluded", ())) for s in self._shards]
    self._starts = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64).tolist()
    self._len = self._starts[-1]

  def __getstate__(self):  # grain's worker processes get a copy without the lock
    state = dict(self.__dict__)
    del state["_lock"], state["_index_lock"]
    state["_blocks"] = collections.OrderedDict()
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock, self._index_lock = threading.Lock(), threading.Lock()

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:
    return f"RecordSource({self.root!r}, {self._len} records, {len(self._shards)} shards)"

  def _count(self, name: str, n: int) -> None:
    with self._lock:
      self.stats["bytes"] += n
      self.stats["requests"] += 1
      self.stats["objects"].add(name)

  def _read(self, rel: str, start: int, stop: int) -> bytes:
    data = self._fs.cat_file(paths.join(self.root, rel), start, stop)
    if len(data) != stop - start:
      raise OSError(f"{self.root}/{rel}: read {len(data)} bytes at {start}, wanted {stop - start}")
    self._count(rel, len(data))
    return data

  def locate(self, index: int) -> tuple[int, int]:
    """(shard, raw record index in the shard) of record `index`."""
    if not 0 <= index < self._len:
      raise IndexError(f"record {index} out of [0, {self._len})")
    s = bisect.bisect_right(self._starts, index) - 1
    r = index - self._starts[s]
    for e in self._shards[s].get("excluded", ()):  # sorted: skip each excluded one at or before r
      if e <= r:
        r += 1
      else:
        break
    return s, r

  def _offsets(self, s: int, r: int) -> tuple[int, int]:
    block = r // INDEX_BLOCK
    with self._index_lock:  # misses are rare (one per block): one reader loads, none twice
      cached = self._blocks.get((s, block))
      if cached is not None:
        self._blocks.move_to_end((s, block))
      else:
        first = block * INDEX_BLOCK
        last = min(first + INDEX_BLOCK, self._shards[s]["num_records"])  # offsets [first, last]
        rel = f"{SHARDS}/{self._shards[s]['stem']}.idx"
        cached = np.frombuffer(self._read(rel, 8 * first, 8 * (last + 1)), "<u8")
        self._blocks[(s, block)] = cached
        if len(self._blocks) > INDEX_CACHE_BLOCKS:
          self._blocks.popitem(last=False)
    j = r - block * INDEX_BLOCK
    return int(cached[j]), int(cached[j + 1])

  def read_at(self, s: int, r: int, index: int | None = None) -> dict[str, Any]:
    """Raw record `r` of shard `s`, unpacked (read with the shard's index)."""
    start, stop = self._offsets(s, r)
    data = self._read(f"{SHARDS}/{self._shards[s]['stem']}.rec", start, stop)
    with self._lock:
      self.stats["record_bytes"] += len(data)
      self.stats["indices"].append((s, r) if index is None else index)
    return msgpack.unpackb(data)

  def read_raw(self, index: int) -> dict[str, Any]:
    """Record `index` unpacked: {"key", "image" (bytes), "caption", "json"}."""
    return self.read_at(*self.locate(index), index=index)

  def __getitem__(self, index) -> dict[str, Any]:
    rec = self.read_raw(int(index))
    # index: the key of the record's text embedding (text/shards.py, data.embedding_id_key)
    out = {"caption": rec["caption"], "key": rec["key"], "index": np.int64(index)}
    out["image"] = decode.load_rgb(rec["image"]) if self._decode else rec["image"]
    return out
