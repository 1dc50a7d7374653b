"""img2dataset webdataset shards -> record shards (`records.py`), with a per-image report.

An img2dataset shard is a tar of samples `<key>.jpg` + `<key>.txt` (the caption) + `<key>.json`
(metadata; its "caption" is used when the .txt is missing), members of one sample adjacent (the
webdataset convention: the key is the member name up to the first '.' of its base name).

`prepare(shards, out, ...)` converts the input shards of this process (shard i goes to process
i mod process_count) into one record shard each, then writes the dataset manifest once every
shard is finished (whichever process finds them all finished writes it; they write the same
bytes). A record shard is finished when its report exists (`records.write_shard` writes it last),
so after a kill the next run skips finished shards and redoes the others from the start.

Every sample is decoded whole before it is kept (`decode.normalize_encoded`); a skipped one is
counted and listed with its reason, never dropped silently:

- "corrupt image": the image member does not decode completely (reason names the error);
- "no image": no image member (or one lost in a corrupt tar member);
- "no caption": no .txt, an empty one, or not UTF-8, and no caption in the .json;
- "too small": shorter side below `min_size`;
- "duplicate key": a key seen before in the same shard (or, found by the manifest, in an earlier
  shard: that record is excluded from the dataset, `records.py`);
- "truncated shard": the tar ends inside a member; the sample being read is skipped;
- "corrupt tar member": a header whose checksum does not match; the reader resynchronises at the
  next valid header, and the lost member's sample is reported by what it lacks.
"""

from __future__ import annotations

import json
import logging
import os
from typing import BinaryIO, Iterator

import fsspec.core

from imagen_jax import atomic, paths
from imagen_jax.data import decode, records

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
BLOCK = 512
# What PIL raises for bytes that are not a complete, usable image.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def _header_ok(block: bytes) -> bool:
  """Whether a 512-byte block is a tar header with a matching checksum."""
  try:
    stored = int(block[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
  except ValueError:
    return False
  return stored == sum(block[:148]) + 8 * 32 + sum(block[156:])


def _read_exact(f: BinaryIO, n: int) -> bytes:
  out = bytearray()
  while len(out) < n:
    chunk = f.read(n - len(out))
    if not chunk:
      break
    out += chunk
  return bytes(out)


def read_tar(f: BinaryIO) -> Iterator[tuple[str, object]]:
  """Streams a tar: yields ("member", (name, data)) for each regular file, ("corrupt", offset)
  for each header with a bad checksum (skipped block by block to the next valid header), and
  ("truncated", offset) once if the stream ends inside a member or before the end marker.
  Handles ustar prefixes, GNU long names ('L') and pax 'path' records."""
  offset, long_name = 0, None
  corrupt_at = None
  while True:
    block = _read_exact(f, BLOCK)
    if len(block) < BLOCK:
      yield "truncated", offset
      return
    if block == b"\0" * BLOCK:
      return  # the end-of-archive marker (a second zero block may follow)
    if not _header_ok(block):
      if corrupt_at is None:
        corrupt_at = offset
        yield "corrupt", offset
      offset += BLOCK
      continue
    corrupt_at = None
    size = int(block[124:136].replace(b"\0", b" ").strip() or b"0", 8)
    kind = block[156:157]
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
    padded = (size + BLOCK - 1) // BLOCK * BLOCK
    data = _read_exact(f, padded)
    if len(data) < padded:
      yield "truncated", offset
      return
    offset += BLOCK + padded
    data = data[:size]
    if kind == b"L":
      long_name = data.split(b"\0", 1)[0]
      continue
    if kind in (b"x", b"g"):
      for line in data.decode("utf-8", "replace").splitlines():
        _, _, rec = line.partition(" ")
        k, _, v = rec.partition("=")
        if k == "path" and kind == b"x":
          long_name = v.encode()
      continue
    full = long_name or (prefix + b"/" + name if prefix else name)
    long_name = None
    if kind in (b"0", b"\0", b"7"):
      yield "member", (full.decode("utf-8", "replace"), data)


def _split_name(name: str) -> tuple[str, str]:
  """webdataset's (key, extension): the path up to the first '.' of the base name."""
  folder, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return os.path.join(folder, stem), ext.lower()


def _samples(f: BinaryIO, skip) -> Iterator[tuple[str, dict]]:
  """Groups adjacent members by key -> (key, {extension: bytes}); reports tar problems."""
  key, parts = None, {}
  for event, value in read_tar(f):
    if event == "corrupt":
      skip(f"@{value}", "corrupt tar member", f"bad header checksum at byte {value}")
      continue
    if event == "truncated":
      if key is not None:
        skip(key, "truncated shard", f"the shard ends inside this sample (byte {value})")
        key = None
      else:
        skip(f"@{value}", "truncated shard", f"the shard ends at byte {value} without its end")
      return
    k, ext = _split_name(value[0])
    if k != key:
      if key is not None:
        yield key, parts
      key, parts = k, {}
    parts[ext] = value[1]
  if key is not None:
    yield key, parts


def _caption(parts: dict) -> str | None:
  try:
    text = parts["txt"].decode("utf-8").strip() if "txt" in parts else ""
  except UnicodeDecodeError:
    text = ""
  if not text and "json" in parts:
    try:
      meta = json.loads(parts["json"])
      text = str(meta.get("caption") or "").strip() if isinstance(meta, dict) else ""
    except ValueError:
      text = ""
  return text or None


def convert_shard(f: BinaryIO, *, min_size: int = 0) -> tuple[list[bytes], dict, list[str]]:
  """One webdataset tar -> (packed records, report {"decoded", "skipped": [{key, reason,
  detail}], "skipped_by_reason": {reason: count}, "keys"}, the records' captions)."""
  out, skipped, seen, captions = [], [], set(), []

  def skip(key, reason, detail=""):
    logging.warning("webdataset: skipping %s: %s %s", key, reason, detail)
    skipped.append({"key": key, "reason": reason, "detail": detail})

  keys = []
  for key, parts in _samples(f, skip):
    if key in seen:
      skip(key, "duplicate key", "a sample of this key came earlier in the shard")
      continue
    seen.add(key)
    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
    if image is None:
      skip(key, "no image", f"members: {sorted(parts)}")
      continue
    caption = _caption(parts)
    if caption is None:
      skip(key, "no caption", "no .txt (or an empty / non-UTF-8 one) and no json caption")
      continue
    try:
      encoded, _, (h, w) = decode.normalize_encoded(image)
    except DECODE_ERRORS as e:
      skip(key, "corrupt image", f"{type(e).__name__}: {e}")
      continue
    if min(h, w) < min_size:
      skip(key, "too small", f"{w}x{h}, shorter side below min_size={min_size}")
      continue
    meta = parts.get("json", b"").decode("utf-8", "replace")
    out.append(records.pack_record(key, encoded, caption, meta))
    keys.append(key)
    captions.append(caption)
  by_reason: dict[str, int] = {}
  for s in skipped:
    by_reason[s["reason"]] = by_reason.get(s["reason"], 0) + 1
  report = dict(decoded=len(out), skipped=skipped, skipped_by_reason=by_reason, keys=keys)
  return out, report, captions


def list_shards(spec: str) -> list[str]:
  """Input shards from a comma-separated list of paths, globs (`gs://b/laion/*.tar`) or
  brace ranges (`{00000..00099}.tar`, img2dataset's naming), sorted and de-duplicated."""
  found: list[str] = []
  for part in [p for p in spec.split(",") if p.strip()]:
    part = part.strip()
    if "{" in part and ".." in part:
      head, rest = part.split("{", 1)
      rng, tail = rest.split("}", 1)
      lo, hi = rng.split("..")
      found += [f"{head}{i:0{len(lo)}d}{tail}" for i in range(int(lo), int(hi) + 1)]
    elif any(c in part for c in "*?["):
      fs, _ = fsspec.core.url_to_fs(part)
      proto = part.split("://", 1)[0] + "://" if paths.is_remote(part) else ""
      found += [proto + p for p in fs.glob(part)]
    else:
      found.append(part)
  if not found:
    raise ValueError(f"--shards={spec!r} names no shard")
  return sorted(set(found))


def shard_stem(shard: str) -> str:
  base = os.path.basename(shard.rstrip("/"))
  return base[: -len(".tar")] if base.endswith(".tar") else base


def prepare(
    shards: list[str],
    out: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    min_size: int = 0,
) -> dict | None:
  """Converts this process's shards into `out` (resumable); returns the manifest if every
  shard is finished (this or another process wrote it), else None."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
  stems = [shard_stem(s) for s in shards]
  dup = sorted({s for s in stems if stems.count(s) > 1})
  if dup:
    raise ValueError(f"input shards share the names {dup}; each shard needs its own file name")
  for i, (shard, stem) in enumerate(zip(shards, stems)):
    if i % process_count != process_index:
      continue
    if records.read_shard_report(out, stem) is not None:
      logging.info("webdataset: %s finished before; kept", stem)
      continue
    with fsspec.open(shard, "rb") as f:
      recs, report, captions = convert_shard(f, min_size=min_size)
    text = {"keys": report["keys"], "captions": captions}
    records.write_shard(out, stem, recs, dict(report, source=shard), text)
    logging.warning(
        "webdataset: %s: %d decoded, skipped %s", stem, len(recs), report["skipped_by_reason"]
    )
  return finalize(out, stems)


def finalize(out: str, stems: list[str]) -> dict | None:
  """Writes `out/dataset.json` once every shard has its report; returns it (None if some shard
  is unfinished). A key found in an earlier shard is excluded from later ones (reported)."""
  if set(stems) - records.finished_stems(out):  # one listing, before reading any report
    return None
  reports = [records.read_shard_report(out, s) for s in stems]
  if any(r is None for r in reports):
    return None
  seen: dict[str, str] = {}
  shards, totals, dups = [], {}, []
  for stem, rep in zip(stems, reports):
    excluded = []
    for j, key in enumerate(rep["keys"]):
      if key in seen:
        excluded.append(j)
        dups.append({"key": key, "reason": "duplicate key", "detail": f"{stem}, kept {seen[key]}"})
      else:
        seen[key] = stem
    shards.append(
        dict(stem=stem, num_records=rep["num_records"], bytes=rep["bytes"], excluded=excluded)
    )
    for reason, n in rep["skipped_by_reason"].items():
      totals[reason] = totals.get(reason, 0) + n
  if dups:
    totals["duplicate key"] = totals.get("duplicate key", 0) + len(dups)
  manifest = dict(
      format=records.FORMAT,
      num_records=sum(s["num_records"] - len(s["excluded"]) for s in shards),
      decoded=sum(r["decoded"] for r in reports),
      skipped_by_reason=totals,
      duplicates_across_shards=dups,
      shards=shards,
  )
  atomic.write_json(paths.join(out, records.MANIFEST), manifest, indent=1)
  return manifest
