"""A TFDS builder over a local folder of images with captions (bring your own data).

Layout of `image_dir`, either
- `manifest.jsonl`: one JSON object per line, {"image": "<path relative to image_dir>",
  "caption": "<text>"}, UTF-8; or, without a manifest,
- a caption file beside each image: `cat.jpg` + `cat.txt` (UTF-8; surrounding whitespace is
  stripped), in any sub-folder.

Every file and manifest line is checked while building and a bad one is skipped, counted, logged
(a warning per file + a summary) and listed in `skipped_files.json` next to the built dataset
(`builder.data_dir`): unreadable, corrupt or truncated images (PIL must decode them completely),
unsupported files, images without a caption or with an empty one, and manifest lines that are
not UTF-8, not a JSON object, lack "image" or "caption", give a caption that is not a string, or
name a missing file or one outside `image_dir`. Bad manifest lines are reported by line number
(`manifest.jsonl:<n>` in the report, and one warning listing the numbers). Skipping is never
fatal; a folder where nothing is usable is an error.

Paths outside `image_dir` (absolute, `../x.png`, or a symbolic link resolving outside) are
skipped like any other bad line, never opened: the build stays usable when one line of a large
manifest is wrong, and the report names the line. Image decoding is `decode.load_rgb`'s (EXIF
orientation applied, transparency composited on the config's `background`, default white,
16-bit and palette images scaled to 8-bit RGB).

Images are stored RGB: upright RGB JPEG files byte for byte (no re-encoding loss), every other
image re-encoded losslessly as PNG. The config name carries a fingerprint of the folder listing
(paths, sizes, mtimes) and of the background, so a changed folder or setting is a new dataset
and is rebuilt, never mixed up with the old build. TFDS writes each build into `incomplete.*`
and renames it only when it has finished, so an interrupted build is never read as a whole one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import warnings
from typing import Iterator, Sequence

import PIL.Image
import tensorflow_datasets as tfds

from imagen_jax.data import decode

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST = "manifest.jsonl"
REPORT = "skipped_files.json"
# What PIL raises for a file that is not a complete, usable image.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError)


@dataclasses.dataclass
class ImageTextConfig(tfds.core.BuilderConfig):
  image_dir: str = ""
  background: tuple[int, int, int] = decode.WHITE  # transparency is composited on this colour


class ManifestWarning(UserWarning):
  """Some manifest lines were bad and skipped (their numbers are in the message)."""


def _listing(image_dir: str) -> list[tuple[str, int, int]]:
  """(relative path, size, mtime_ns) of every file under image_dir, sorted."""
  out = []
  for root, dirs, files in os.walk(image_dir):
    dirs.sort()
    for name in files:
      path = os.path.join(root, name)
      # A dangling symbolic link is listed by its own stat (and skipped when built).
      st = os.stat(path) if os.path.exists(path) else os.lstat(path)
      out.append((os.path.relpath(path, image_dir), st.st_size, st.st_mtime_ns))
  return sorted(out)


def folder_config(
    image_dir: str | os.PathLike, background: Sequence[int] = decode.WHITE
) -> ImageTextConfig:
  """The builder config of a folder: named `<folder>_<fingerprint of listing + background>`."""
  image_dir = os.path.abspath(os.fspath(image_dir))
  if not os.path.isdir(image_dir):
    raise ValueError(f"image_dir {image_dir!r} is not a directory")
  background = decode.check_background(background)
  key = {"listing": _listing(image_dir), "background": background}
  digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]
  base = re.sub(r"[^a-zA-Z0-9_]", "_", os.path.basename(image_dir)).strip("_") or "folder"
  return ImageTextConfig(
      name=f"{base}_{digest}",
      image_dir=image_dir,
      background=background,
      description=f"images and captions from {image_dir}",
  )


def outside_reason(image_dir: str, rel: str) -> str | None:
  """Why the path `rel` is not a file inside `image_dir` (None if it is).

  Refused: absolute paths, paths climbing out with `..`, and paths whose real location
  (symbolic links resolved) is outside the real `image_dir`.
  """
  if os.path.isabs(rel) or re.match(r"^[A-Za-z]:", rel):
    return f"absolute path {rel!r}; paths must be relative to the image folder"
  norm = os.path.normpath(rel)
  if norm == os.pardir or norm.startswith(os.pardir + os.sep):
    return f"path {rel!r} leaves the image folder"
  root = os.path.realpath(image_dir)
  real = os.path.realpath(os.path.join(root, norm))
  if os.path.commonpath([root, real]) != root:
    return f"path {rel!r} resolves (through a symbolic link) to {real!r}, outside the image folder"
  return None


def read_manifest(image_dir: str) -> tuple[list[tuple[int, str, str]], list[tuple[int, str]]]:
  """Reads `image_dir/manifest.jsonl` line by line -> (rows, bad lines).

  rows: (line number, image path relative to image_dir, caption) of each good line.
  bad lines: (line number, reason) of each line that is not UTF-8, not a JSON object, lacks a
  string "image" or "caption", or names a path outside image_dir. Blank lines are ignored; line
  numbers count from 1; a UTF-8 byte-order mark on line 1 is allowed.
  """
  with open(os.path.join(image_dir, MANIFEST), "rb") as f:
    data = f.read()
  rows, bad = [], []
  for lineno, raw in enumerate(data.split(b"\n"), 1):
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
      raw = raw[3:]
    if not raw.strip():
      continue
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      bad.append((lineno, f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"))
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      bad.append((lineno, f"not JSON ({e.msg} at column {e.colno})"))
      continue
    if not isinstance(row, dict):
      bad.append(
          (lineno, f'not a JSON object {{"image": ..., "caption": ...}}: {line.strip()[:80]}')
      )
      continue
    problem = None
    for field in ("image", "caption"):
      if field not in row:
        problem = f'missing field "{field}"; expected {{"image": ..., "caption": ...}}'
      elif not isinstance(row[field], str):
        problem = (
            f'"{field}" must be a string, got {type(row[field]).__name__} '
            f"{json.dumps(row[field])[:80]}"
        )
      if problem:
        break
    if problem is None and not row["image"].strip():
      problem = '"image" is empty'
    if problem is None:
      problem = outside_reason(image_dir, row["image"])
    if problem:
      bad.append((lineno, problem))
      continue
    rows.append((lineno, row["image"], row["caption"]))
  return rows, bad


def load_image(path: str, background: Sequence[int] = decode.WHITE) -> tuple[bytes, str]:
  """Decodes the whole file (catches corrupt and truncated images) -> (encoded RGB, format).

  An upright RGB JPEG (no EXIF rotation) is kept byte for byte; every other image is decoded by
  `decode.to_rgb` (EXIF orientation applied, alpha composited on `background`, 16-bit and
  palette images scaled to 8-bit RGB) and re-encoded losslessly as PNG. Raises one of
  `DECODE_ERRORS` for anything that is not a complete, usable image.
  """
  with open(path, "rb") as f:
    data = f.read()
  encoded, fmt, _ = decode.normalize_encoded(data, background)
  return encoded, fmt


class ImageText(tfds.core.GeneratorBasedBuilder):
  """Images + captions from a local folder; one `train` split (slice it: 'train[:95%]')."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "First version.",
      "1.1.0": "Decoding by decode.to_rgb (EXIF orientation, alpha on a background, 16-bit "
      "scaling); manifest lines checked one by one; paths outside the folder refused.",
  }
  BUILDER_CONFIGS = []  # one config per folder, made by folder_config

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.skipped: list[dict] = []
    self.bad_manifest_lines: list[int] = []

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "caption": tfds.features.Text(),
                "file_name": tfds.features.Text(),
            }
        ),
    )

  def _skip(self, rel: str, reason: str) -> None:
    logging.warning("image_text: skipping %s: %s", rel, reason)
    self.skipped.append({"file": rel, "reason": reason})

  def _pairs(self) -> list[tuple[str, str | None]]:
    """(relative image path, caption or None) candidates; records skips it can see now."""
    root = self.builder_config.image_dir
    if os.path.exists(os.path.join(root, MANIFEST)):
      return self._manifest_pairs(root)
    pairs, captions = [], set()
    for rel, _, _ in _listing(root):
      stem, ext = os.path.splitext(rel)
      if ext.lower() == ".txt":
        captions.add(stem)
        continue
      if ext.lower() not in IMAGE_EXTENSIONS:
        self._skip(
            rel, f"unsupported file type {ext or '(none)'!r}; images are " f"{IMAGE_EXTENSIONS}"
        )
        continue
      outside = outside_reason(root, rel)
      if outside:
        self._skip(rel, outside)
        continue
      txt = os.path.join(root, stem + ".txt")
      caption = None
      if os.path.exists(txt):
        try:
          with open(txt, encoding="utf-8") as f:
            caption = f.read()
        except (OSError, UnicodeDecodeError) as e:
          self._skip(stem + ".txt", f"unreadable caption ({e!r})")
          continue
      pairs.append((rel, caption))
    images = {os.path.splitext(rel)[0] for rel, _ in pairs}
    for stem in sorted(captions - images):
      if not any(s["file"] == stem + ".txt" for s in self.skipped):
        self._skip(stem + ".txt", "caption file without a usable image")
    return pairs

  def _manifest_pairs(self, root: str) -> list[tuple[str, str]]:
    rows, bad = read_manifest(root)
    for lineno, reason in bad:
      self._skip(f"{MANIFEST}:{lineno}", reason)
    self.bad_manifest_lines = [lineno for lineno, _ in bad]
    if bad:
      shown = ", ".join(str(n) for n in self.bad_manifest_lines[:50])
      more = "" if len(bad) <= 50 else f" and {len(bad) - 50} more"
      warnings.warn(
          f"image_text: {len(bad)} bad line(s) in {os.path.join(root, MANIFEST)} skipped: "
          f"line(s) {shown}{more}; the reasons are in {REPORT} and the log",
          ManifestWarning,
          stacklevel=2,
      )
    listed = {MANIFEST} | {os.path.normpath(rel) for _, rel, _ in rows}
    for rel, _, _ in _listing(root):
      if os.path.normpath(rel) not in listed:
        self._skip(rel, "not listed in manifest.jsonl")
    return [(rel, caption) for _, rel, caption in rows]

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[int, dict]]:
    root = self.builder_config.image_dir
    self.skipped = []
    self.bad_manifest_lines = []
    kept = 0
    for index, (rel, caption) in enumerate(self._pairs()):
      if caption is None:
        self._skip(rel, "no caption")
        continue
      caption = caption.strip()
      if not caption:
        self._skip(rel, "empty caption")
        continue
      path = os.path.join(root, rel)
      try:
        encoded, _ = load_image(path, self.builder_config.background)
      except FileNotFoundError:
        self._skip(rel, "file not found")
        continue
      except DECODE_ERRORS as e:
        self._skip(rel, f"not a complete, readable image ({type(e).__name__}: {e})")
        continue
      kept += 1
      # The key is the candidate's index: a manifest may list one image several times
      # (one line per caption).
      yield index, {"image": encoded, "caption": caption, "file_name": rel}
    if kept == 0:
      raise ValueError(
          f"no usable image+caption pairs in {root!r}; skipped: " f"{self.skipped[:10]}"
      )
    # While TFDS builds, self.data_dir is the incomplete.* directory, so the report is
    # renamed into place together with the data: no finished dataset lacks its report.
    report = {
        "image_dir": root,
        "num_examples": kept,
        "num_skipped": len(self.skipped),
        "bad_manifest_lines": self.bad_manifest_lines,
        "skipped": self.skipped,
    }
    with open(os.path.join(self.data_dir, REPORT), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
    logging.warning(
        "image_text: %d examples kept, %d files skipped (%d bad manifest lines), listed in %s",
        kept,
        len(self.skipped),
        len(self.bad_manifest_lines),
        os.path.join(self.data_dir, REPORT),
    )


def build_image_text(
    image_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    background: Sequence[int] = decode.WHITE,
) -> ImageText:
  """Builds (or reuses) the dataset of `image_dir`; returns the builder.

  `background`: (r, g, b) that transparent pixels are composited on (default white).
  The skip report is `os.path.join(builder.data_dir, "skipped_files.json")`:
  {"image_dir", "num_examples", "num_skipped", "bad_manifest_lines": [line numbers],
  "skipped": [{"file", "reason"}, ...]}; a bad manifest line's "file" is "manifest.jsonl:<n>".
  """
  builder = ImageText(
      config=folder_config(image_dir, background),
      data_dir=None if data_dir is None else os.fspath(data_dir),
      file_format="array_record",
  )
  builder.download_and_prepare()
  return builder


def read_report(builder: ImageText) -> dict:
  """The skip report written by `build_image_text`."""
  with open(os.path.join(builder.data_dir, REPORT), encoding="utf-8") as f:
    return json.load(f)
