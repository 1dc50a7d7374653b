"""Image-text folders: bad files are skipped, counted and reported; good ones load."""

import io
import json
import os
import sys

import numpy as np
import PIL.Image
import pytest

from imagen_jax.data import image_text, pipeline


def _jpeg(h, w, seed=0, mode="RGB"):
  rng = np.random.default_rng(seed)
  img = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
  buf = io.BytesIO()
  img.save(buf, format="JPEG")
  return buf.getvalue()


def _png(h, w, mode):
  img = PIL.Image.new(mode, (w, h), color=128 if mode == "L" else (10, 200, 30, 255))
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


@pytest.fixture
def folder(tmp_path):
  d = tmp_path / "my photos"
  _write(str(d / "a.jpg"), _jpeg(40, 60, 1))
  _write(str(d / "a.txt"), "a noisy picture\n")
  _write(str(d / "sub" / "b.png"), _png(48, 32, "L"))  # grayscale -> RGB
  _write(str(d / "sub" / "b.txt"), "a grey square")
  _write(str(d / "c.png"), _png(33, 33, "RGBA"))  # alpha dropped
  _write(str(d / "c.txt"), "a green square")
  _write(str(d / "corrupt.jpg"), b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
  _write(str(d / "corrupt.txt"), "never used")
  full = _jpeg(64, 64, 2)
  _write(str(d / "truncated.jpg"), full[: len(full) // 2])
  _write(str(d / "truncated.txt"), "half an image")
  _write(str(d / "empty.jpg"), _jpeg(20, 20, 3))
  _write(str(d / "empty.txt"), "   \n")
  _write(str(d / "nocaption.jpg"), _jpeg(20, 20, 4))
  _write(str(d / "notes.csv"), "x,y\n1,2\n")
  _write(str(d / "orphan.txt"), "a caption without an image")
  return d


def test_folder_with_bad_files_builds_and_reports_each(folder, tmp_path):
  builder = image_text.build_image_text(folder, tmp_path / "tfds")
  source = builder.as_data_source()["train"]
  got = {source[i]["file_name"].decode(): source[i] for i in range(len(source))}
  assert sorted(got) == ["a.jpg", "c.png", os.path.join("sub", "b.png")]
  for ex in got.values():
    assert ex["image"].ndim == 3 and ex["image"].shape[-1] == 3
  assert got["a.jpg"]["caption"] == b"a noisy picture"
  assert got["a.jpg"]["image"].shape == (40, 60, 3)
  report = image_text.read_report(builder)
  reasons = {s["file"]: s["reason"] for s in report["skipped"]}
  assert report["num_examples"] == 3 and report["num_skipped"] == len(reasons) == 6
  assert "not a complete, readable image" in reasons["corrupt.jpg"]
  assert "truncated" in reasons["truncated.jpg"]
  assert reasons["empty.jpg"] == "empty caption"
  assert reasons["nocaption.jpg"] == "no caption"
  assert "unsupported file type '.csv'" in reasons["notes.csv"]
  assert reasons["orphan.txt"] == "caption file without a usable image"
  assert "tensorflow" not in sys.modules
  leftovers = [d for _, dirs, _ in os.walk(tmp_path / "tfds") for d in dirs if "incomplete" in d]
  assert not leftovers


def test_manifest_and_loader(folder, tmp_path):
  lines = [
      {"image": "a.jpg", "caption": "first"},
      {"image": "a.jpg", "caption": "second"},
      {"image": "missing.jpg", "caption": "gone"},
      {"caption": "no image key"},
  ]
  _write(str(folder / "manifest.jsonl"), "\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
  builder = image_text.build_image_text(folder, tmp_path / "tfds")
  report = image_text.read_report(builder)
  reasons = {s["file"]: s["reason"] for s in report["skipped"]}
  assert report["num_examples"] == 2
  assert reasons["missing.jpg"] == "file not found"
  assert "bad manifest line" in reasons["manifest.jsonl:4"]
  assert "bad manifest line" in reasons["manifest.jsonl:5"]
  assert reasons["c.png"] == "not listed in manifest.jsonl"
  cfg = pipeline.default_data_config(
      "image_text",
      image_dir=str(folder),
      data_dir=str(tmp_path / "tfds"),
      crop="random",
      keep_caption=True,
  )
  it = pipeline.make_loader(
      cfg,
      image_size=32,
      lowres_size=8,
      global_batch_size=2,
      seed=0,
      process_index=0,
      process_count=1,
  )
  batch = next(it)
  assert batch["image"].shape == (2, 32, 32, 3) and batch["lowres"].shape == (2, 8, 8, 3)
  assert sorted(map(str, batch["caption"])) == ["first", "second"]


def test_changed_folder_is_a_new_dataset(folder, tmp_path):
  first = image_text.build_image_text(folder, tmp_path / "tfds")
  _write(str(folder / "d.jpg"), _jpeg(16, 16, 5))
  _write(str(folder / "d.txt"), "one more")
  second = image_text.build_image_text(folder, tmp_path / "tfds")
  assert first.builder_config.name != second.builder_config.name
  assert len(second.as_data_source()["train"]) == 4


def test_missing_folder_is_named(tmp_path):
  with pytest.raises(ValueError, match="nowhere"):
    image_text.build_image_text(tmp_path / "nowhere", tmp_path)


def test_interrupted_build_is_never_taken_for_a_whole_one(folder, tmp_path, monkeypatch):
  real = image_text.load_image
  calls = []

  def dies_on_second(path):
    calls.append(path)
    if len(calls) == 2:
      raise KeyboardInterrupt  # e.g. the job is killed mid-build
    return real(path)

  monkeypatch.setattr(image_text, "load_image", dies_on_second)
  with pytest.raises(KeyboardInterrupt):
    image_text.build_image_text(folder, tmp_path / "tfds")
  monkeypatch.setattr(image_text, "load_image", real)
  builder = image_text.ImageText(
      config=image_text.folder_config(folder),
      data_dir=str(tmp_path / "tfds"),
      file_format="array_record",
  )
  assert not builder.is_prepared()  # only an incomplete.* directory exists
  builder = image_text.build_image_text(folder, tmp_path / "tfds")
  assert len(builder.as_data_source()["train"]) == 3


def test_folder_without_usable_pairs_is_an_error(tmp_path):
  d = tmp_path / "bad"
  _write(str(d / "x.jpg"), b"junk")
  _write(str(d / "x.txt"), "caption")
  with pytest.raises(ValueError, match="no usable image\\+caption pairs"):
    image_text.build_image_text(d, tmp_path / "tfds")
