"""Image-text folders: bad files are skipped, counted and reported; good ones load."""

import io
import json
import os
import struct
import sys
import zlib

import numpy as np
import PIL.Image
import pytest

from imagen_jax.data import decode, image_text, pipeline


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
  _write(str(d / "c.png"), _png(33, 33, "RGBA"))  # opaque RGBA: composited, unchanged
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
  """Two captions for one image, a missing file, bad lines; then the training loader reads it."""
  lines = [
      {"image": "a.jpg", "caption": "first"},
      {"image": "a.jpg", "caption": "second"},
      {"image": "missing.jpg", "caption": "gone"},
      {"caption": "no image key"},
  ]
  _write(str(folder / "manifest.jsonl"), "\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
  with pytest.warns(image_text.ManifestWarning, match=r"line\(s\) 4, 5;"):
    builder = image_text.build_image_text(folder, tmp_path / "tfds")
  report = image_text.read_report(builder)
  reasons = {s["file"]: s["reason"] for s in report["skipped"]}
  assert report["num_examples"] == 2
  assert reasons["missing.jpg"] == "file not found"
  assert reasons["manifest.jsonl:4"].startswith('missing field "image"')
  assert reasons["manifest.jsonl:5"].startswith("not JSON")
  assert report["bad_manifest_lines"] == [4, 5]
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

  def dies_on_second(path, *args):
    calls.append(path)
    if len(calls) == 2:
      raise KeyboardInterrupt  # e.g. the job is killed mid-build
    return real(path, *args)

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


# ---- Faithful decoding (decode.load_rgb): each file kind is made here with PIL. ----

RED, BLUE = (230, 20, 20), (20, 20, 230)


def _halves(h, w, left, right, mode="RGB"):
  """[h, w] image: left half `left`, right half `right`."""
  arr = np.empty((h, w, 3), np.uint8)
  arr[:, : w // 2], arr[:, w // 2 :] = left, right
  return PIL.Image.fromarray(arr).convert(mode)


def _encode(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _exif_jpeg(orientation):
  """A 20x40 (H x W) JPEG stored red | blue, tagged with EXIF `orientation`."""
  img = _halves(20, 40, RED, BLUE)
  exif = img.getexif()
  exif[decode.EXIF_ORIENTATION] = orientation
  return _encode(img, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation, top, bottom", [(6, RED, BLUE), (8, BLUE, RED)])
def test_exif_orientation_applied(orientation, top, bottom):
  # Tag 6: the stored image is shown rotated 90 degrees clockwise, its left column on top;
  # tag 8: counter-clockwise, its left column at the bottom.
  rgb = decode.load_rgb(_exif_jpeg(orientation))
  assert rgb.dtype == np.uint8 and rgb.shape == (40, 20, 3)
  np.testing.assert_allclose(rgb[:15].reshape(-1, 3).mean(0), top, atol=6)
  np.testing.assert_allclose(rgb[25:].reshape(-1, 3).mean(0), bottom, atol=6)
  upright = decode.load_rgb(_exif_jpeg(1))
  assert upright.shape == (20, 40, 3)


def test_exif_rotated_jpeg_is_stored_upright(tmp_path):
  d = tmp_path / "photos"
  _write(str(d / "upright.jpg"), _exif_jpeg(1))
  _write(str(d / "upright.txt"), "upright")
  _write(str(d / "sideways.jpg"), _exif_jpeg(6))
  _write(str(d / "sideways.txt"), "sideways")
  source = image_text.build_image_text(d, tmp_path / "tfds").as_data_source()["train"]
  got = {source[i]["file_name"].decode(): source[i]["image"] for i in range(len(source))}
  assert got["upright.jpg"].shape == (20, 40, 3)
  assert got["sideways.jpg"].shape == (40, 20, 3)
  np.testing.assert_allclose(got["sideways.jpg"][:15].reshape(-1, 3).mean(0), RED, atol=6)
  # An upright RGB JPEG is kept byte for byte: exactly what PIL decodes from the file.
  np.testing.assert_array_equal(
      got["upright.jpg"], np.asarray(PIL.Image.open(str(d / "upright.jpg")))
  )


def _transparent_square():
  """16x16 RGBA: transparent background, opaque red 8x8 centre, a half-transparent corner."""
  arr = np.zeros((16, 16, 4), np.uint8)
  arr[..., :3] = (0, 255, 0)  # the colour under alpha 0 must not show
  arr[4:12, 4:12] = (*RED, 255)
  arr[0, 0] = (0, 0, 0, 128)
  return PIL.Image.fromarray(arr, "RGBA")


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0), (10, 20, 30)])
def test_alpha_composited_on_background(background):
  rgb = decode.load_rgb(_encode(_transparent_square(), "PNG"), background)
  assert rgb.shape == (16, 16, 3)
  np.testing.assert_array_equal(rgb[15, 15], background)
  np.testing.assert_array_equal(rgb[8, 8], RED)
  # alpha 128 of black over the background: round(bg * 127 / 255)
  np.testing.assert_array_equal(rgb[0, 0], [(c * 127 + 127) // 255 for c in background])


def test_alpha_default_background_is_white_for_la_and_palette():
  la = PIL.Image.fromarray(
      np.stack([np.full((4, 4), 50, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA"
  )
  np.testing.assert_array_equal(decode.load_rgb(_encode(la, "PNG")), np.full((4, 4, 3), 255))
  pal = PIL.Image.new("P", (4, 4), 1)
  pal.putpalette([0, 255, 0, *RED] + [0] * 762)
  pal.putpixel((0, 0), 0)
  rgb = decode.load_rgb(_encode(pal, "PNG", transparency=0))  # palette index 0 transparent
  np.testing.assert_array_equal(rgb[0, 0], (255, 255, 255))
  np.testing.assert_array_equal(rgb[1, 1], RED)


def test_alpha_background_setting_is_a_new_dataset(tmp_path):
  d = tmp_path / "cutouts"
  _write(str(d / "sq.png"), _encode(_transparent_square(), "PNG"))
  _write(str(d / "sq.txt"), "a red square")
  white = image_text.build_image_text(d, tmp_path / "tfds")
  black = image_text.build_image_text(d, tmp_path / "tfds", background=(0, 0, 0))
  assert white.builder_config.name != black.builder_config.name
  np.testing.assert_array_equal(white.as_data_source()["train"][0]["image"][15, 15], (255,) * 3)
  np.testing.assert_array_equal(black.as_data_source()["train"][0]["image"][15, 15], (0,) * 3)
  with pytest.raises(ValueError, match=r"background must be three ints in \[0, 255\]"):
    image_text.build_image_text(d, tmp_path / "tfds", background=(0, 0, 256))


def test_16bit_grey_png_scaled_not_clipped():
  values = np.array([[0, 257, 32768, 65535]], np.uint16)
  img = PIL.Image.fromarray(values)
  assert img.mode == "I;16"
  rgb = decode.load_rgb(_encode(img, "PNG"))
  np.testing.assert_array_equal(rgb[..., 0], [[0, 1, 128, 255]])
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
  grey = decode.load_rgb(_encode(PIL.Image.fromarray(np.full((8, 8), 32768, np.uint16)), "PNG"))
  assert np.all(grey == 128)  # PIL's own convert("RGB") gives 255 here


def _png16(arr, color_type):
  """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): arr uint16 [H, W, C]."""
  h, w = arr.shape[:2]
  raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
  return (
      b"\x89PNG\r\n\x1a\n"
      + chunk(b"IHDR", ihdr)
      + chunk(b"IDAT", zlib.compress(raw))
      + chunk(b"IEND", b"")
  )


def test_16bit_rgb_png_scaled():
  arr = np.empty((3, 5, 3), np.uint16)
  arr[...] = (65535, 32768, 257)
  rgb = decode.load_rgb(_png16(arr, color_type=2))
  exact = np.round(np.array([65535, 32768, 257]) * 255 / 65535)
  assert np.all(np.abs(rgb.astype(int) - exact) <= 1)
  rgba = np.concatenate([arr, np.zeros((3, 5, 1), np.uint16)], -1)  # fully transparent
  np.testing.assert_array_equal(
      decode.load_rgb(_png16(rgba, 6), (1, 2, 3)), np.full((3, 5, 3), (1, 2, 3))
  )


def test_palette_png_decoded_to_its_colours():
  img = _halves(6, 8, RED, BLUE).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=4)
  assert img.mode == "P"
  rgb = decode.load_rgb(_encode(img, "PNG"))
  np.testing.assert_array_equal(rgb[:, :4], np.broadcast_to(RED, (6, 4, 3)))
  np.testing.assert_array_equal(rgb[:, 4:], np.broadcast_to(BLUE, (6, 4, 3)))


def test_images_without_a_value_range_are_refused():
  with pytest.raises(ValueError, match="mode 'F'"):
    decode.load_rgb(_encode(PIL.Image.new("F", (4, 4), 0.5), "TIFF"))


# ---- Manifests: read line by line, each bad line skipped and reported by number. ----


def test_manifest_bad_lines_skipped_with_line_numbers(tmp_path):
  d = tmp_path / "set"
  _write(str(d / "a.jpg"), _jpeg(16, 16, 1))
  _write(str(d / "b.png"), _png(12, 12, "L"))
  _write(str(tmp_path / "x.png"), _png(8, 8, "L"))  # exists, but outside the folder
  os.symlink(tmp_path / "x.png", d / "link.png")
  lines = [
      b'{"image": "a.jpg", "caption": "a good line"}',  # 1
      '{"image": "a.jpg", "caption": "caf\u00e9 latin-1"}'.encode("latin-1"),  # 2: not UTF-8
      b'{"image": "a.jpg", "caption": ',  # 3: not JSON
      b'{"image": "a.jpg", "caption": ["a", "list"]}',  # 4: caption not a string
      b'{"image": "../x.png", "caption": "climbs out"}',  # 5
      json.dumps({"image": str(tmp_path / "x.png"), "caption": "absolute"}).encode(),  # 6
      b'{"image": "link.png", "caption": "symlink out"}',  # 7
      b"",  # blank lines are ignored
      b'["a.jpg", "not an object"]',  # 9
      b'{"image": "b.png"}',  # 10: no caption
      b'{"image": 3, "caption": "image not a string"}',  # 11
      '{"image": "b.png", "caption": "gr\u00fcn, a second good line"}'.encode(),  # 12
  ]
  _write(str(d / "manifest.jsonl"), b"\n".join(lines) + b"\n")
  with pytest.warns(image_text.ManifestWarning, match=r"line\(s\) 2, 3, 4, 5, 6, 7, 9, 10, 11;"):
    builder = image_text.build_image_text(d, tmp_path / "tfds")
  report = image_text.read_report(builder)
  assert report["bad_manifest_lines"] == [2, 3, 4, 5, 6, 7, 9, 10, 11]
  reasons = {s["file"]: s["reason"] for s in report["skipped"]}
  line = lambda n: reasons[f"manifest.jsonl:{n}"]  # noqa: E731
  assert line(2) == "not UTF-8 (byte 0xe9 at column 35)"
  assert line(3).startswith("not JSON")
  assert line(4) == '"caption" must be a string, got list ["a", "list"]'
  assert "leaves the image folder" in line(5)
  assert line(6).startswith("absolute path")
  assert "symbolic link" in line(7) and "outside the image folder" in line(7)
  assert line(9).startswith("not a JSON object")
  assert line(10).startswith('missing field "caption"')
  assert line(11) == '"image" must be a string, got int 3'
  assert report["num_examples"] == 2
  source = builder.as_data_source()["train"]
  captions = sorted(source[i]["caption"].decode() for i in range(len(source)))
  assert captions == ["a good line", "gr\u00fcn, a second good line"]


def test_manifest_utf8_bom_and_crlf_accepted(tmp_path):
  d = tmp_path / "set"
  _write(str(d / "a.jpg"), _jpeg(16, 16, 1))
  text = '\ufeff{"image": "a.jpg", "caption": "one"}\r\n{"image": "./a.jpg", "caption": "two"}\r\n'
  _write(str(d / "manifest.jsonl"), text.encode("utf-8"))
  rows, bad = image_text.read_manifest(str(d))
  assert bad == [] and [(n, c) for n, _, c in rows] == [(1, "one"), (2, "two")]


def test_folder_symlink_outside_is_skipped(tmp_path):
  d = tmp_path / "set"
  _write(str(d / "a.jpg"), _jpeg(16, 16, 1))
  _write(str(d / "a.txt"), "inside")
  _write(str(tmp_path / "secret.png"), _png(8, 8, "L"))
  os.symlink(tmp_path / "secret.png", d / "b.png")
  _write(str(d / "b.txt"), "outside")
  report = image_text.read_report(image_text.build_image_text(d, tmp_path / "tfds"))
  assert report["num_examples"] == 1
  reasons = {s["file"]: s["reason"] for s in report["skipped"]}
  assert "outside the image folder" in reasons["b.png"]
