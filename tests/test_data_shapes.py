"""The offline shapes dataset: builds without TensorFlow, deterministic, captions = attributes."""

import os
import sys

import numpy as np
import pytest

from imagen_jax.data import shapes


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("shapes")
  return shapes.build_shapes(data_dir, 32, num_train=64, num_test=48, seed=3)


@pytest.mark.parametrize("resolution", [32, 64, 256])
def test_builds_offline_without_tensorflow(tmp_path, resolution):
  builder = shapes.build_shapes(tmp_path, resolution, num_train=6, num_test=4, seed=0)
  sources = builder.as_data_source()
  assert len(sources["train"]) == 6 and len(sources["test"]) == 4
  example = sources["train"][0]
  assert example["image"].shape == (resolution, resolution, 3)
  assert example["image"].dtype == np.uint8
  assert isinstance(example["caption"], bytes)
  assert "tensorflow" not in sys.modules
  # TFDS builds into incomplete.* and renames on success: nothing half-built is left.
  leftovers = [d for _, dirs, _ in os.walk(tmp_path) for d in dirs if "incomplete" in d]
  assert not leftovers
  # A second call reuses the finished build.
  again = shapes.build_shapes(tmp_path, resolution, num_train=6, num_test=4, seed=0)
  np.testing.assert_array_equal(again.as_data_source()["train"][0]["image"], example["image"])


def test_examples_are_deterministic_from_the_seed():
  a = shapes.make_example(7, "train", 11, 32)
  b = shapes.make_example(7, "train", 11, 32)
  c = shapes.make_example(8, "train", 11, 32)
  np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
  assert a["caption"] == b["caption"]
  assert (a["caption"], np.asarray(a["image"]).tobytes()) != (
      c["caption"],
      np.asarray(c["image"]).tobytes(),
  )


def test_captions_match_attributes(built):
  for split in ("train", "test"):
    source = built.as_data_source()[split]
    for i in range(len(source)):
      ex = source[i]
      attrs = shapes.attributes_from_example(ex)
      objects = [
          dict(color=c, shape=s, size=z, position=p)
          for c, s, z, p in zip(attrs["color"], attrs["shape"], attrs["size"], attrs["position"])
      ]
      caption = ex["caption"].decode()
      assert caption == shapes.caption_for(objects, attrs["relation"])
      for obj in objects:
        assert shapes.object_phrase(obj) in caption
      # The image really shows the attributes: a rerender is identical.
      np.testing.assert_array_equal(ex["image"], shapes.render(objects, 32))
      if attrs["num_objects"] == 2:
        assert tuple(attrs["position"]) == shapes.RELATION_POSITIONS[attrs["relation"]]
      else:
        assert attrs["relation"] == -1


def test_pixels_show_the_palette_colour(built):
  ex = built.as_data_source()["train"][0]
  attrs = shapes.attributes_from_example(ex)
  for color, _shape, pos in zip(attrs["color"], attrs["shape"], attrs["position"]):
    cx, cy = shapes.POSITION_CENTERS[pos]
    # a point inside every kind (the triangle is widest below its box centre)
    y, x = int((cy + 0.05) * 32), int(cx * 32)
    np.testing.assert_allclose(ex["image"][y, x], shapes.PALETTE[color], atol=1)
  assert np.all(ex["image"][0, 0] == 0)  # black background


def test_held_out_pairs_only_in_test_and_marked(built):
  def pairs(ex):
    a = shapes.attributes_from_example(ex)
    return set(zip(a["color"], a["shape"]))

  train = built.as_data_source()["train"]
  test = built.as_data_source()["test"]
  for i in range(len(train)):
    assert not pairs(train[i]) & shapes.HELD_OUT_PAIRS
    assert not train[i]["held_out"]
  flags = []
  for i in range(len(test)):
    flag = bool(test[i]["held_out"])
    assert flag == bool(pairs(test[i]) & shapes.HELD_OUT_PAIRS)
    flags.append(flag)
  assert 0.2 < np.mean(flags) < 0.8  # about half


def test_held_out_pairs_leave_every_colour_and_kind_in_train():
  for c in range(len(shapes.COLOR_NAMES)):
    assert any((c, s) not in shapes.HELD_OUT_PAIRS for s in range(len(shapes.SHAPE_NAMES)))
  for s in range(len(shapes.SHAPE_NAMES)):
    assert any((c, s) not in shapes.HELD_OUT_PAIRS for c in range(len(shapes.COLOR_NAMES)))


def test_two_objects_never_touch():
  # Worst case: two large shapes side by side at the smallest supported layout.
  for relation in range(len(shapes.RELATION_NAMES)):
    objs = [dict(color=0, shape=1, size=1, position=p) for p in shapes.RELATION_POSITIONS[relation]]
    objs[1]["color"] = 4
    img = shapes.render(objs, 32)
    lit = img.max(-1) > 0
    axis = 1 if relation >= 2 else 0
    assert not lit.any(axis=1 - axis)[15:17].any(), relation  # a dark gap in the middle


def test_bad_settings_name_the_value(tmp_path):
  with pytest.raises(ValueError, match="resolution 8"):
    shapes.shapes_builder(tmp_path, 8)
  with pytest.raises(ValueError, match="num_train=0"):
    shapes.shapes_builder(tmp_path, 32, num_train=0)
  with pytest.raises(ValueError, match="split 'val'"):
    shapes.make_example(0, "val", 0, 32)


def test_read_examples_in_generation_order(built):
  rows = shapes.read_examples(built, "test", limit=5)
  assert [r["index"] for r in rows] == list(range(5))
  for r in rows:
    ex = shapes.make_example(3, "test", r["index"], 32)
    assert r["caption"] == ex["caption"] and r["held_out"] == ex["held_out"]
    assert r["attributes"]["num_objects"] == int(ex["num_objects"])


def test_captions_without_rendering_match_the_built_splits(built):
  for split, n in (("train", 64), ("test", 48)):
    rows = shapes.read_examples(built, split)
    assert shapes.captions(3, split, n) == [r["caption"] for r in rows]
  # the scene does not depend on the resolution: an SR stage's captions are the base's
  assert shapes.make_example(3, "train", 5, 64)["caption"] == shapes.captions(3, "train", 6)[5]
