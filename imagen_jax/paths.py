"""Paths that may be local or in a bucket (`gs://bucket/dir`), behind one abstraction.

Every file the library and its entry points read or write goes through etils' `epath` (the
path library Orbax uses): `paths.path(p)` is an `epath.Path` with `open`, `exists`, `iterdir`,
`glob`, `mkdir`, `read_text` ... on a local folder or a bucket alike. `gs://` is served by
`gcsfs` through fsspec, also where TensorFlow is installed (`EPATH_USE_TF=false` unless set:
one client, whose settings are these).
Orbax's array writes go through TensorStore's own GCS client.

    p = paths.path("gs://bucket/run") / "config.json"
    paths.join("gs://bucket/run", "samples")   # -> "gs://bucket/run/samples" (a str)
    paths.is_remote("gs://bucket/run")         # True; False for a local path
    paths.check_access("gs://bucket/run")      # before any work: one-line AccessError
    paths.load_npz("gs://bucket/stats.npz")    # {name: array}
    paths.local_copy("gs://bucket/data")       # a local copy, for readers of local files only
    paths.local_file("gs://bucket/coco/captions.json")  # the same for one object

Credentials: Application Default Credentials (`gcloud auth application-default login`,
`GOOGLE_APPLICATION_CREDENTIALS`, or a GCP VM's service account). A local emulator (the tests
start fake-gcs-server): set `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`; gcsfs then talks to
it anonymously and TensorStore is pointed at it here (`TENSORSTORE_GCS_HTTP_URL`, a test token),
unless those are set already. Set them before the first bucket access of the process.
"""

from __future__ import annotations

import io
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Union

import fsspec.config
import fsspec.core
import numpy as np
from etils import epath

PathLike = Union[str, os.PathLike]

REMOTE_SCHEMES = ("gs://",)  # tested against a GCS emulator; s3:// etc. would need their package
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# A probe waits at most this long for the storage endpoint (gcsfs itself retries for minutes).
PROBE_TIMEOUT_S = 10.0


class AccessError(RuntimeError):
  """A bucket path that cannot be used: no credentials, endpoint unreachable, no such bucket."""


def configure_environment() -> None:
  """Settings the storage clients read when they start: run at import, and again by a caller
  that sets `STORAGE_EMULATOR_HOST` later (a test starting its emulator)."""
  # gcsfs's experimental zonal-bucket support asks a gRPC control plane about every bucket first,
  # 60 s per try against an endpoint without it (an emulator); the JSON API serves all others.
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  os.environ.setdefault("EPATH_USE_TF", "false")  # gcsfs, not tf.io.gfile, where TF is present
  host = os.environ.get(EMULATOR_ENV, "")
  if host in ("", "default"):
    return
  url = host if host.startswith(("http://", "https://")) else f"http://{host}"
  fsspec.config.conf.setdefault("gcs", {}).setdefault("token", "anon")  # an emulator: no auth
  os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
  os.environ.setdefault("TENSORSTORE_GCS_HTTP_VERSION", "1.1")  # plain http: no HTTP/2 upgrade
  os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # TensorStore's no-auth


configure_environment()


def is_remote(p: PathLike) -> bool:
  """True for a bucket path (`gs://...`)."""
  return os.fspath(p).startswith(REMOTE_SCHEMES)


def path(p: PathLike) -> epath.Path:
  """`p` as an `epath.Path` (a local path stays as given: relative stays relative)."""
  return epath.Path(p)


def absolute(p: PathLike) -> epath.Path:
  """`p` made absolute: a local path against the working folder; a bucket path as it is
  (`epath.Path.absolute` would prefix it with the working folder)."""
  return path(p) if is_remote(p) else path(p).absolute()


def join(base: PathLike, *parts: str) -> str:
  """`os.path.join` that keeps `gs://` intact; returns a str."""
  return os.fspath(path(base).joinpath(*parts))


def load_npz(p: PathLike) -> dict:
  """Every array of the `.npz` file `p` (local or bucket), read whole; no pickle."""
  with np.load(io.BytesIO(path(p).read_bytes()), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def makedirs(p: PathLike) -> None:
  """Creates the folder `p` and its parents (on a bucket, folders are implied: a no-op)."""
  if not is_remote(p):
    os.makedirs(p, exist_ok=True)


def _split_bucket(p: str) -> tuple[str, str]:
  """`gs://bucket/a/b` -> ("bucket", "a/b")."""
  rest = p.split("://", 1)[1]
  bucket, _, key = rest.partition("/")
  if not bucket:
    raise AccessError(f"{p!r} names no bucket; allowed: gs://BUCKET[/PATH]")
  return bucket, key.strip("/")


def _endpoint() -> str:
  host = os.environ.get(EMULATOR_ENV, "")
  if host in ("", "default"):
    return "https://storage.googleapis.com"
  return host if host.startswith(("http://", "https://")) else f"http://{host}"


def _access_token(p: str) -> str | None:
  """An OAuth token from Application Default Credentials (None for an emulator)."""
  if os.environ.get(EMULATOR_ENV, "") not in ("", "default"):
    return None
  # Deferred: google.auth costs 0.3 s to import; only a bucket's credentials check needs it.
  import google.auth
  import google.auth.exceptions
  import google.auth.transport.requests

  try:
    credentials, _ = google.auth.default(
        scopes=["https://www.googleapis.com/auth/devstorage.read_write"]
    )
    credentials.refresh(google.auth.transport.requests.Request())
  except google.auth.exceptions.GoogleAuthError as e:
    raise AccessError(
        f"{p}: no usable Google Cloud credentials ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:200]}); run `gcloud auth application-default login`, set "
        f"GOOGLE_APPLICATION_CREDENTIALS, run on a GCP VM, or set {EMULATOR_ENV} for an emulator"
    ) from None
  return credentials.token


def check_access(p: PathLike) -> None:
  """Fails fast, with one line naming `p`, unless its bucket exists and can be listed.

  One request with a `PROBE_TIMEOUT_S` timeout and no retries (the storage clients retry an
  unreachable endpoint for minutes); a local path passes. Raises AccessError.
  """
  p = os.fspath(p)
  if not is_remote(p):
    return
  bucket, key = _split_bucket(p)
  token = _access_token(p)
  query = urllib.parse.urlencode({"prefix": key, "maxResults": 1, "fields": "kind"})
  url = f"{_endpoint()}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o?{query}"
  request = urllib.request.Request(url)
  if token:
    request.add_header("Authorization", f"Bearer {token}")
  try:
    with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
      json.load(response)
  except urllib.error.HTTPError as e:
    if e.code == 404:
      raise AccessError(f"{p}: bucket {bucket!r} does not exist at {_endpoint()}") from None
    if e.code in (401, 403):
      raise AccessError(
          f"{p}: the credentials may not list bucket {bucket!r} (HTTP {e.code}); grant them "
          "storage.objects.list/get/create/delete on it"
      ) from None
    raise AccessError(f"{p}: storage endpoint {_endpoint()} answered HTTP {e.code}") from None
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", e)
    raise AccessError(
        f"{p}: cannot reach the storage endpoint {_endpoint()} ({reason}) within "
        f"{PROBE_TIMEOUT_S:g} s"
    ) from None


def cache_root() -> str:
  """Where bucket folders are copied for readers that need local files:
  `$IMAGEN_JAX_CACHE` or `~/.cache/imagen_jax`."""
  return os.environ.get("IMAGEN_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "imagen_jax"
  )


def local_path(p: PathLike) -> str:
  """Where `local_copy` keeps bucket folder `p`: `cache_root()/gs/<bucket>/<path>` (`p` itself
  when local)."""
  p = os.fspath(p)
  if not is_remote(p):
    return p
  bucket, key = _split_bucket(p)
  return os.path.join(cache_root(), p.split("://", 1)[0], bucket, *key.split("/"))


def local_copy(p: PathLike, *, missing_ok: bool = False) -> str:
  """A local folder holding folder `p`'s files: `p` itself when local; for a bucket folder, its
  copy at `local_path(p)`. An object is downloaded when the copy lacks it
  or its version (GCS generation / md5 / size, recorded in `<copy>.versions.json`) changed;
  each download goes to a temporary that is then renamed (a cut one is never taken for a file).

  For readers that open local files only (ArrayRecord, TFDS's data sources, safetensors).
  missing_ok: an empty (absent) bucket folder gives an empty local folder instead of an error.
  """
  p = os.fspath(p)
  if not is_remote(p):
    return p
  local = local_path(p)
  fs, root = fsspec.core.url_to_fs(p)
  listing = fs.find(root, detail=True)
  if not listing and not missing_ok:
    raise FileNotFoundError(f"{p}: no such folder (no objects under it)")
  os.makedirs(local, exist_ok=True)
  record = local.rstrip("/") + ".versions.json"
  try:
    with open(record) as f:
      have = json.load(f)
  except (OSError, ValueError):
    have = {}
  for name, info in sorted(listing.items()):
    rel = os.path.relpath(name, root)
    version = str(info.get("generation") or info.get("md5Hash") or info.get("size"))
    dest = os.path.join(local, rel)
    if have.get(rel) == version and os.path.exists(dest):
      continue
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.download-{os.getpid()}"
    fs.get_file(name, tmp)
    os.replace(tmp, dest)
    have[rel] = version
    with open(record + f".{os.getpid()}", "w") as f:
      json.dump(have, f)
    os.replace(record + f".{os.getpid()}", record)
  return local


def local_file(p: PathLike) -> str:
  """A local file holding object `p`'s bytes: `p` itself when local; for a bucket object, its
  copy at `local_path(p)`, downloaded when absent or when the object's version changed (the
  version is kept in `<copy>.version`); the download goes to a temporary that is then renamed."""
  p = os.fspath(p)
  if not is_remote(p):
    return p
  fs, name = fsspec.core.url_to_fs(p)
  try:
    info = fs.info(name)
  except FileNotFoundError:
    raise FileNotFoundError(f"{p}: no such object") from None
  if info.get("type") == "directory":
    raise IsADirectoryError(f"{p} is a bucket folder, not an object; use local_copy")
  version = str(info.get("generation") or info.get("md5Hash") or info.get("size"))
  dest = local_path(p)
  record = dest + ".version"
  try:
    with open(record) as f:
      if f.read() == version and os.path.exists(dest):
        return dest
  except OSError:
    pass
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  tmp = f"{dest}.download-{os.getpid()}"
  fs.get_file(name, tmp)
  os.replace(tmp, dest)
  with open(record + f".{os.getpid()}", "w") as f:
    f.write(version)
  os.replace(record + f".{os.getpid()}", record)
  return dest


def upload_missing(local: PathLike, p: PathLike) -> int:
  """Uploads each file under local folder `local` that bucket folder `p` lacks (one upload per
  file: an object appears whole or not at all); returns how many. For content that is the same
  whoever writes it (a dataset built from a seed), so concurrent writers may race harmlessly."""
  local, p = os.fspath(local), os.fspath(p)
  n = 0
  for root, _, files in os.walk(local):
    for name in sorted(files):
      src = os.path.join(root, name)
      dest = path(p) / os.path.relpath(src, local)
      if not dest.exists():
        with open(src, "rb") as f:
          dest.write_bytes(f.read())
        n += 1
  return n
