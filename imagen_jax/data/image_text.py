"""A TFDS builder over a local folder of images with captions (bring your own data).

Layout of `image_dir`, either
- `manifest.jsonl`: one JSON object per line, {"image": "<path relative to image_dir>",
  "caption": "<text>"}; or, without a manifest,
- a caption file beside each image: `cat.jpg` + `cat.txt` (UTF-8; surrounding whitespace is
  stripped), in any sub-folder.

Every file is checked while building: unreadable, corrupt or truncated images (PIL must decode
them completely), unsupported files, images without a caption or with an empty one, and
manifest lines that are broken or name a missing file are skipped, counted, logged (warning per
file + a summary) and listed in `skipped_files.json` next to the built dataset
(`builder.data_dir`). Skipping is never fatal; a folder where nothing is usable is an error.

Images are stored RGB: RGB JPEG files byte for byte (no re-encoding loss), every other image
re-encoded losslessly as PNG. The config name carries a fingerprint of the folder listing
(paths, sizes, mtimes), so a changed folder is a new dataset and is rebuilt, never mixed up
with the old build. TFDS writes each build into `incomplete.*` and renames it only when it has
finished, so an interrupted build is never read as a whole one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
from typing import Iterator

import PIL.Image
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST = "manifest.jsonl"
REPORT = "skipped_files.json"


@dataclasses.dataclass
class ImageTextConfig(tfds.core.BuilderConfig):
  image_dir: str = ""


def _listing(image_dir: str) -> list[tuple[str, int, int]]:
  """(relative path, size, mtime_ns) of every file under image_dir, sorted."""
  out = []
  for root, dirs, files in os.walk(image_dir):
    dirs.sort()
    for name in files:
      path = os.path.join(root, name)
      st = os.stat(path)
      out.append((os.path.relpath(path, image_dir), st.st_size, st.st_mtime_ns))
  return sorted(out)


def folder_config(image_dir: str | os.PathLike) -> ImageTextConfig:
  """The builder config of a folder: named `<folder>_<fingerprint of its listing>`."""
  image_dir = os.path.abspath(os.fspath(image_dir))
  if not os.path.isdir(image_dir):
    raise ValueError(f"image_dir {image_dir!r} is not a directory")
  digest = hashlib.sha1(json.dumps(_listing(image_dir)).encode()).hexdigest()[:12]
  base = re.sub(r"[^a-zA-Z0-9_]", "_", os.path.basename(image_dir)).strip("_") or "folder"
  return ImageTextConfig(
      name=f"{base}_{digest}",
      image_dir=image_dir,
      description=f"images and captions from {image_dir}",
  )


def load_image(path: str) -> tuple[bytes, str]:
  """Decodes the whole file (catches corrupt and truncated images) -> (encoded RGB, format).

  Raises OSError / ValueError (from PIL) for anything that is not a complete image.
  """
  with open(path, "rb") as f:
    data = f.read()
  with PIL.Image.open(io.BytesIO(data)) as img:
    img.load()  # full decode: a truncated file raises here ("image file is truncated")
    if img.format == "JPEG" and img.mode == "RGB":
      return data, "jpeg"
    rgb = img.convert("RGB")
  buf = io.BytesIO()
  rgb.save(buf, format="PNG")
  return buf.getvalue(), "png"


class ImageText(tfds.core.GeneratorBasedBuilder):
  """Images + captions from a local folder; one `train` split (slice it: 'train[:95%]')."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  BUILDER_CONFIGS = []  # one config per folder, made by folder_config

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.skipped: list[dict] = []

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
    manifest = os.path.join(root, MANIFEST)
    if os.path.exists(manifest):
      pairs = []
      listed = {MANIFEST}
      with open(manifest, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            row = json.loads(line)
            rel, caption = str(row["image"]), row.get("caption")
          except (json.JSONDecodeError, KeyError, TypeError) as e:
            self._skip(
                f"{MANIFEST}:{lineno}",
                f"bad manifest line ({e!r}); " 'expected {"image": ..., "caption": ...}',
            )
            continue
          listed.add(os.path.normpath(rel))
          pairs.append((rel, None if caption is None else str(caption)))
      for rel, _, _ in _listing(root):
        if os.path.normpath(rel) not in listed:
          self._skip(rel, "not listed in manifest.jsonl")
      return pairs
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

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[int, dict]]:
    root = self.builder_config.image_dir
    self.skipped = []
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
        encoded, _ = load_image(path)
      except FileNotFoundError:
        self._skip(rel, "file not found")
        continue
      except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
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
        "skipped": self.skipped,
    }
    with open(os.path.join(self.data_dir, REPORT), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
    logging.warning(
        "image_text: %d examples kept, %d files skipped, listed in %s",
        kept,
        len(self.skipped),
        os.path.join(self.data_dir, REPORT),
    )


def build_image_text(
    image_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None
) -> ImageText:
  """Builds (or reuses) the dataset of `image_dir`; returns the builder.

  The skip report is `os.path.join(builder.data_dir, "skipped_files.json")`:
  {"image_dir", "num_examples", "num_skipped", "skipped": [{"file", "reason"}, ...]}.
  """
  builder = ImageText(
      config=folder_config(image_dir),
      data_dir=None if data_dir is None else os.fspath(data_dir),
      file_format="array_record",
  )
  builder.download_and_prepare()
  return builder


def read_report(builder: ImageText) -> dict:
  """The skip report written by `build_image_text`."""
  with open(os.path.join(builder.data_dir, REPORT), encoding="utf-8") as f:
    return json.load(f)
