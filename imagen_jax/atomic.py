"""Atomic file and folder writes: a reader sees the whole new file or none, never a part.

Local paths: each write goes to a unique temporary name in the destination's folder (same file
system, so the rename is atomic on POSIX) and `os.replace` moves it into place; on any error the
temporary is removed. Temporary names carry the process id and a random suffix (`tempfile`), so
concurrent writers of the same path never collide; the last rename wins. etils' `epath` (the
path library in use) writes in place, without a temporary, hence this module. A folder that
replaces another is swapped in with one `renameat2(RENAME_EXCHANGE)` on Linux (a reader sees the
old folder or the new one, never neither); elsewhere the old one is renamed aside first.

Bucket paths (`gs://`, `paths.is_remote`): a bucket has no rename (gcsfs copies, then deletes),
but an object is created, or replaced, only when its upload completes: a reader sees the old
object or the whole new one, and an upload cut by a kill leaves no object. So a file is written
in full to a local temporary first (the writer may fail half way) and then uploaded in one
request, and that upload is the commit. A folder has no such single commit: `publish_dir`
uploads its files, then the marker object `<folder>/COMPLETE` last; `is_complete(folder)` is the
reader's test (a cut upload leaves files but no marker).

    atomic.write_text(path, text)           atomic.write_json(path, obj)
    atomic.write_bytes(path, data)          atomic.save_npz(path, compressed=True, a=x, b=y)
    atomic.save_png(path, image_or_pil)     atomic.save_figure(path, matplotlib_figure)
    with atomic.publish_dir(final) as tmp:  # fill tmp; renamed to `final` on success
      ...
    atomic.replace_dir(src, final)          # move a finished folder over `final`
    atomic.is_complete(final)               # a published folder (bucket: its marker exists)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

import numpy as np
import PIL.Image

from imagen_jax import paths

TMP_PREFIX = ".tmp-"
COMPLETE = "COMPLETE"  # the marker object `publish_dir` writes last into a bucket folder


def _upload(path: str, local_file: str) -> None:
  """One object upload (the commit of a bucket write): the object appears whole or not at all."""
  with open(local_file, "rb") as f:
    data = f.read()
  paths.path(path).write_bytes(data)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


# The modes `open()` / `os.makedirs` give under this process's umask (0o644 / 0o755 under 022):
# mkstemp / mkdtemp create 0o600 / 0o700, and a result renamed from one would be unreadable to
# the group. Read once: setting the umask to read it is not thread-safe.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


def _tmp_name(path: str, suffix: str = "") -> str:
  """A fresh, unused file name next to `path` (created empty, so no other writer gets it)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
      prefix=f"{TMP_PREFIX}{os.path.basename(path)}-{os.getpid()}-", suffix=suffix, dir=folder
  )
  os.fchmod(fd, FILE_MODE)
  os.close(fd)
  return tmp


def write_with(path: str, write: Callable[[str], None], *, suffix: str = "") -> str:
  """Calls `write(tmp_path)`, then renames the temporary to `path`; returns `path`.

  `suffix` keeps a file extension on the temporary for writers that choose the format by
  extension (PIL, matplotlib). On a bucket the temporary is local and its upload is the commit.
  """
  path = os.fspath(path)
  remote = paths.is_remote(path)
  if remote:
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix)
    os.close(fd)
  else:
    tmp = _tmp_name(path, suffix)
  try:
    write(tmp)
    if remote:
      _upload(path, tmp)
      os.remove(tmp)
    else:
      os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  return path


def write_bytes(path: str, data: bytes) -> str:
  def write(tmp):
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())

  return write_with(path, write)


def write_text(path: str, text: str, encoding: str = "utf-8") -> str:
  return write_bytes(path, text.encode(encoding))


def write_json(path: str, obj: Any, *, indent: int | None = 2) -> str:
  return write_text(path, json.dumps(obj, indent=indent) + "\n")


def save_npz(path: str, *, compressed: bool = False, **arrays: np.ndarray) -> str:
  """`np.savez(_compressed)` to `path` (which should end in .npz: numpy appends it otherwise)."""
  save = np.savez_compressed if compressed else np.savez

  def write(tmp):
    with open(tmp, "wb") as f:  # a file object: numpy adds no extension
      save(f, **arrays)

  return write_with(path, write)


def save_png(path: str, image) -> str:
  """A PIL image, or a uint8 array `[H, W]` / `[H, W, C]`, as PNG."""
  if not isinstance(image, PIL.Image.Image):
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise ValueError(f"save_png wants a PIL image or uint8 array, got dtype {image.dtype}")
    image = PIL.Image.fromarray(
        image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    )
  return write_with(path, lambda tmp: image.save(tmp, format="PNG"), suffix=".png")


def save_figure(path: str, figure, **savefig_kwargs) -> str:
  """A matplotlib figure (format from the extension of `path`)."""
  ext = os.path.splitext(os.fspath(path))[1]
  return write_with(path, lambda tmp: figure.savefig(tmp, **savefig_kwargs), suffix=ext)


@contextlib.contextmanager
def publish_dir(final: str, *, overwrite: bool = False, tmp: str | None = None) -> Iterator[str]:
  """Yields a fresh temporary folder next to `final`; renamed to `final` when the block ends.

  If the block raises, the temporary is removed and `final` is untouched. If `final` exists
  when the block ends: with `overwrite` it is replaced (`replace_dir`); without, the new folder
  is dropped and the existing one kept (another writer finished the same content first).

  `tmp`: a fixed temporary path instead of a unique one, for a single writer whose readers
  recognise a leftover by name (e.g. `<dir>.incomplete`); a leftover there is removed first, so
  it is unsafe with several writers (each would delete the other's folder): leave `tmp` unset
  for those.

  On a bucket the yielded folder is a local temporary; at the end its files are uploaded into
  `final` and the marker `final/COMPLETE` last (`is_complete`); with `overwrite` the old
  folder's marker, then its objects, are deleted first. `tmp` is ignored there.
  """
  if paths.is_remote(final):
    with _publish_remote(os.fspath(final), overwrite=overwrite) as local:
      yield local
    return
  parent = os.path.dirname(os.path.abspath(final))
  os.makedirs(parent, exist_ok=True)
  if tmp is None:
    tmp = tempfile.mkdtemp(
        prefix=f"{TMP_PREFIX}{os.path.basename(final)}-{os.getpid()}-", dir=parent
    )
  else:
    if os.path.dirname(os.path.abspath(tmp)) != parent:
      raise ValueError(f"tmp {tmp!r} must be in the folder of {final!r} (one file system)")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if overwrite:
    replace_dir(tmp, final)
    return
  try:
    if os.path.exists(final):
      raise FileExistsError(final)
    os.rename(tmp, final)
  except OSError as e:
    # Another writer published `final` first (before the check or between it and the rename).
    if not isinstance(e, FileExistsError) and e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
      raise
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _publish_remote(final: str, *, overwrite: bool) -> Iterator[str]:
  local = tempfile.mkdtemp(prefix=TMP_PREFIX)
  try:
    yield local
    if is_complete(final) and not overwrite:
      return  # another writer finished the same content first
    upload_dir(local, final)
  finally:
    shutil.rmtree(local, ignore_errors=True)


def upload_dir(local: str, final: str) -> None:
  """Copies the local folder `local` into the bucket folder `final` (replacing what is there),
  then writes the marker `final/COMPLETE` last: `is_complete(final)` only once every file is in.
  """
  dest = paths.path(final)
  marker = dest / COMPLETE
  if dest.exists():
    if marker.exists():
      marker.unlink()  # first: from here on no reader takes the folder for whole
    dest.rmtree()
  for root, _, files in os.walk(local):
    for name in sorted(files):
      src = os.path.join(root, name)
      _upload(os.fspath(dest / os.path.relpath(src, local)), src)
  marker.write_text("")


def is_complete(folder: str | os.PathLike) -> bool:
  """Whether `folder` was published whole: it exists (local: `publish_dir` renames a finished
  folder into place) or, on a bucket, its marker `COMPLETE` exists."""
  if paths.is_remote(folder):
    return (paths.path(folder) / COMPLETE).exists()
  return os.path.isdir(folder)


def _exchange(a: str, b: str) -> bool:
  """Swaps paths `a` and `b` in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the
  OS or file system has no such call."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
    return False
  raise OSError(err, os.strerror(err), a, None, b)


def replace_dir(src: str, final: str) -> None:
  """Moves folder `src` to `final` (same file system), replacing any folder there.

  An existing `final` is swapped with `src` in one step where the OS allows (a reader sees the
  whole old folder or the whole new one); elsewhere it is renamed aside, then `src` renamed in (a
  reader may see no folder for that instant, never a mix). The old folder is then deleted.
  A bucket `final` (with a local `src`) is written by `upload_dir`, and `src` removed.
  """
  if paths.is_remote(final):
    upload_dir(src, os.fspath(final))
    shutil.rmtree(src, ignore_errors=True)
    return
  if not os.path.exists(final):
    try:
      os.rename(src, final)
      return
    except OSError as e:  # `final` appeared meanwhile: swap it out below
      if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
        raise
  if _exchange(src, final):
    shutil.rmtree(src, ignore_errors=True)  # `src` now holds the old folder
    return
  parent = os.path.dirname(os.path.abspath(final))
  old = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.path.basename(final)}-old-", dir=parent)
  os.rmdir(old)  # only the unique name is wanted
  os.rename(final, old)
  os.rename(src, final)
  shutil.rmtree(old, ignore_errors=True)
