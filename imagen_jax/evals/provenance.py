"""The key of an evaluation artefact: a hash of everything that produced it, checked on load.

Resumable evaluation artefacts (COCO sample chunks, reference statistics, sweep points, feature
statistics files) are reused across runs that write into the same folder. Each one carries an
`identity`: a JSON-able dict of what produced it (stage workdirs, checkpoint steps, config and
params digests, sampler settings, seed, prompts, chunk size, preprocessing mode, feature
extractor, reference set). Its key is

    key = sha256(canonical_json(identity))      (hex; canonical: sorted keys, no spaces)

and is stored inside the artefact together with the identity itself (`.npz`: the string fields
`provenance_key` and `provenance_identity`; `.json`: `{"provenance": {...}, "data": ...}`),
written atomically (`imagen_jax.atomic`). On load the stored identity must hash to the stored
key (else the file was edited) and the key must equal the expected one (else something that
produced it differs); a mismatch is never reused: `load_if_matches` returns None so the caller
recomputes, `require` raises `StaleArtefactError` naming each differing field, old and new.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
import zipfile
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from imagen_jax import atomic, paths

KEY_FIELD = "provenance_key"
IDENTITY_FIELD = "provenance_identity"


class StaleArtefactError(ValueError):
  """An artefact on disk was produced by something other than what is asked for now."""


class StaleArtefactWarning(UserWarning):
  """An artefact on disk did not match and is being recomputed."""


def _jsonable(x: Any) -> Any:
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return dataclasses.asdict(x)
  if hasattr(x, "to_dict"):  # ml_collections.ConfigDict
    return x.to_dict()
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"provenance identity holds {type(x).__name__} {x!r}, which is not JSON")


def canonical_json(obj: Any) -> str:
  """Deterministic JSON (sorted keys, no whitespace, NaN refused): equal content, equal text."""
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_jsonable)


def artefact_key(identity: Mapping[str, Any]) -> str:
  """sha256 hex of the canonical JSON of `identity` (what produced the artefact)."""
  if not isinstance(identity, Mapping):
    raise TypeError(f"an artefact identity is a dict, got {type(identity).__name__}")
  return hashlib.sha256(canonical_json(dict(identity)).encode()).hexdigest()


def digest(obj: Any) -> str:
  """sha256 hex of any JSON-able value (e.g. a prompt list: newlines inside prompts count)."""
  return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def array_digest(a: np.ndarray) -> str:
  """sha256 hex of an array's dtype, shape and bytes (e.g. in-memory reference images)."""
  a = np.ascontiguousarray(np.asarray(a))
  h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
  h.update(a.tobytes())
  return h.hexdigest()


def tree_digest(tree: Any) -> str:
  """sha256 hex over the leaves of a params tree (paths, dtypes, shapes, bytes), host side."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(array_digest(np.asarray(leaf)).encode())
  return h.hexdigest()


def file_set_identity(folder: str, names: Sequence[str]) -> dict:
  """The identity of a set of files: their sorted names with byte sizes and mtimes (ns).

  Stat only, no reads (40,504 COCO images); a replaced or edited file changes its size or
  mtime. A missing file is an error naming it.
  """
  rows = []
  for n in sorted(names):
    p = os.path.join(folder, n)
    try:
      st = os.stat(p)
    except FileNotFoundError:
      raise ValueError(f"reference file {p!r} does not exist") from None
    rows.append([n, st.st_size, st.st_mtime_ns])
  return {"folder": os.path.abspath(folder), "num_files": len(rows), "files_sha256": digest(rows)}


def file_identity(path: str) -> dict:
  """A weights file (or folder) by absolute path, size and mtime; a folder by its files'."""
  path = os.path.abspath(path)
  if os.path.isdir(path):
    names = sorted(
        os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs
    )
    return file_set_identity(path, names)
  st = os.stat(path)
  return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def stage_identity(stage) -> dict:
  """A loaded cascade stage: workdir, checkpoint step, digests of its config and EMA params.

  Reads the public attributes `workdir`, `step`, `config` and `params` only.
  """
  return {
      "workdir": os.fspath(paths.absolute(stage.workdir)),
      "step": int(stage.step),
      "config_sha256": digest(stage.config),
      "params_sha256": tree_digest(stage.params),
  }


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  """`field: old -> new` for every leaf that differs between two identities."""
  if isinstance(old, Mapping) and isinstance(new, Mapping):
    out = []
    for k in sorted(set(old) | set(new), key=str):
      name = f"{prefix}.{k}" if prefix else str(k)
      if k not in old:
        out.append(f"{name}: (absent) -> {_short(new[k])}")
      elif k not in new:
        out.append(f"{name}: {_short(old[k])} -> (absent)")
      else:
        out += differences(old[k], new[k], name)
    return out
  if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
    return [
        d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{prefix}[{i}]")
    ]
  if canonical_json(old) != canonical_json(new):
    return [f"{prefix or 'identity'}: {_short(old)} -> {_short(new)}"]
  return []


def _short(x: Any, limit: int = 80) -> str:
  s = canonical_json(x)
  return s if len(s) <= limit else s[: limit - 3] + "..."


def _stored(path: str) -> tuple[str | None, Any, Any]:
  """(stored key, stored identity, contents) of an artefact file; key None if it has none."""
  if path.endswith(".npz"):
    arrays = paths.load_npz(path)
    key = arrays.pop(KEY_FIELD, None)
    ident = arrays.pop(IDENTITY_FIELD, None)
    if key is None or ident is None:
      return None, None, arrays
    return str(key), json.loads(str(ident)), arrays
  obj = json.loads(paths.path(path).read_text())
  prov = obj.get("provenance") if isinstance(obj, dict) else None
  if not isinstance(prov, dict) or "key" not in prov or "identity" not in prov:
    return None, None, obj
  return str(prov["key"]), prov["identity"], obj.get("data")


def mismatch(path: str, identity: Mapping[str, Any]) -> tuple[str | None, Any]:
  """(None, contents) when `path` holds an artefact of `identity`; else (why, None)."""
  try:
    key, stored_identity, contents = _stored(path)
  except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:  # truncated / foreign
    return f"{path}: unreadable ({type(e).__name__}: {e})", None
  if key is None:
    return f"{path}: carries no provenance key (written by an older version or by hand)", None
  if not isinstance(stored_identity, Mapping):
    return f"{path}: its provenance identity is not a JSON object (the file was edited)", None
  if artefact_key(stored_identity) != key:
    return f"{path}: the stored key does not match the stored identity (the file was edited)", None
  if key != artefact_key(identity):
    diff = differences(stored_identity, dict(json.loads(canonical_json(dict(identity)))))
    return f"{path}: produced by something else; " + "; ".join(diff or ["key differs"]), None
  return None, contents


def load_if_matches(path: str, identity: Mapping[str, Any]) -> Any:
  """The contents of the artefact at `path` (npz: dict of arrays; json: its data) when its
  stored key is the key of `identity`; None when it is absent or does not match (a
  `StaleArtefactWarning` names what differs), so the caller recomputes it."""
  if not paths.path(path).exists():
    return None
  why, contents = mismatch(path, identity)
  if why is not None:
    warnings.warn(f"{why}; recomputing", StaleArtefactWarning, stacklevel=2)
    return None
  return contents


def require(path: str, identity: Mapping[str, Any]) -> Any:
  """Like `load_if_matches`, but a missing or mismatched artefact is a `StaleArtefactError`."""
  if not paths.path(path).exists():
    raise StaleArtefactError(f"{path} does not exist")
  why, contents = mismatch(path, identity)
  if why is not None:
    raise StaleArtefactError(why)
  return contents


def provenance_fields(identity: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The npz fields that key an artefact (for writers that build their own npz)."""
  return {
      KEY_FIELD: np.str_(artefact_key(identity)),
      IDENTITY_FIELD: np.str_(canonical_json(dict(identity))),
  }


def save_npz(path: str, identity: Mapping[str, Any], *, compressed: bool = False, **arrays) -> str:
  """`atomic.save_npz` with the key and identity stored beside the arrays."""
  clash = {KEY_FIELD, IDENTITY_FIELD} & set(arrays)
  if clash:
    raise ValueError(f"array names {sorted(clash)} are reserved for the provenance record")
  return atomic.save_npz(path, compressed=compressed, **arrays, **provenance_fields(identity))


def write_json(path: str, identity: Mapping[str, Any], data: Any) -> str:
  """`{"provenance": {"key", "identity"}, "data": data}`, written atomically."""
  ident = json.loads(canonical_json(dict(identity)))
  record = {"provenance": {"key": artefact_key(ident), "identity": ident}, "data": data}
  return atomic.write_json(path, record)
