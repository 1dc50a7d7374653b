"""The shapes alignment metric: exact on the dataset's own images, near chance on noise."""

import numpy as np
import pytest

from imagen_jax.data import shapes
from imagen_jax.evals import shapes_metric as sm

N = 120


def dataset(resolution, n=N, split="test", seed=11):
  images, attrs, held, captions = [], [], [], []
  for i in range(n):
    ex = shapes.make_example(seed, split, i, resolution)
    images.append(np.asarray(ex["image"]))
    attrs.append(shapes.attributes_from_example(ex))
    held.append(ex["held_out"])
    captions.append(ex["caption"])
  return images, attrs, held, captions


@pytest.mark.parametrize("resolution", [32, 64])
def test_dataset_images_score_at_least_098(resolution):
  images, attrs, held, _ = dataset(resolution)
  result = sm.score_images(images, attrs, held_out=held)
  for attr in sm.ATTRIBUTES:
    assert result["mean"][attr] >= 0.98, (attr, result["mean"])
  assert 0 < result["num_held_out"] < N
  assert result["held_out"]["color"] >= 0.98 and result["seen"]["shape"] >= 0.98


def test_float_images_in_minus_one_one_score_the_same():
  images, attrs, _, _ = dataset(32, n=30)
  floats = [img.astype(np.float32) / 127.5 - 1.0 for img in images]
  assert sm.score_images(floats, attrs)["mean"] == sm.score_images(images, attrs)["mean"]


def test_mildly_blurred_noisy_images_still_score_high():
  # Generated images are never exact: a little blur and noise must not break the recovery.
  import scipy.ndimage

  images, attrs, _, _ = dataset(32, n=60)
  rng = np.random.default_rng(0)
  degraded = [
      np.clip(
          scipy.ndimage.gaussian_filter(img / 127.5 - 1.0, (0.5, 0.5, 0))
          + 0.05 * rng.normal(size=img.shape),
          -1,
          1,
      )
      for img in images
  ]
  mean = sm.score_images(degraded, attrs)["mean"]
  assert min(mean["color"], mean["shape"], mean["size"], mean["position"]) >= 0.95, mean


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_noise_scores_near_or_below_chance(kind):
  images, attrs, _, _ = dataset(32, n=80)
  rng = np.random.default_rng(1)
  if kind == "uniform":
    noise = rng.integers(0, 256, (80, 32, 32, 3)).astype(np.uint8)
  else:
    noise = np.clip(rng.normal(size=(80, 32, 32, 3)), -1, 1).astype(np.float32)
  mean = sm.score_images(list(noise), attrs)["mean"]
  for attr, chance in sm.CHANCE.items():
    assert mean[attr] <= chance + 0.1, (attr, mean[attr], chance)
  assert mean["exact"] <= 0.02


def test_wrong_attributes_are_caught():
  ex = shapes.make_example(0, "train", 0, 32)
  attrs = shapes.attributes_from_example(ex)
  wrong = dict(attrs, color=[(c + 1) % 6 for c in attrs["color"]])
  assert sm.score_example(np.asarray(ex["image"]), wrong)["color"] == 0.0
  wrong = dict(attrs, shape=[(s + 1) % 3 for s in attrs["shape"]])
  assert sm.score_example(np.asarray(ex["image"]), wrong)["shape"] == 0.0
  blank = np.zeros((32, 32, 3), np.uint8)
  assert sm.score_example(blank, attrs) == {a: 0.0 for a in sm.ATTRIBUTES}


def test_swapped_relation_scores_zero_position_but_full_objects():
  objs = [dict(color=0, shape=0, size=1, position=3), dict(color=4, shape=1, size=0, position=4)]
  image = shapes.render(objs, 32)  # red circle above blue square
  attrs = sm.parse_caption("a large red circle below a small blue square")
  scores = sm.score_example(image, attrs)
  assert scores["position"] == 0.0
  assert scores["color"] == scores["shape"] == scores["size"] == 1.0
  assert (
      sm.score_example(image, sm.parse_caption("a large red circle above a small blue square"))[
          "exact"
      ]
      == 1.0
  )


def test_parse_caption_inverts_the_grammar():
  _, attrs, _, captions = dataset(32, n=50)
  for caption, attr in zip(captions, attrs):
    assert sm.parse_caption(caption) == attr
  with pytest.raises(ValueError, match="not in the shapes grammar"):
    sm.parse_caption("a dog on a skateboard")
  with pytest.raises(ValueError, match="'pink'"):
    sm.parse_caption("a small pink circle on the left")


@pytest.mark.parametrize("background", ["grey", "texture", "black"])
def test_every_background_scores_exact_on_its_own_captions(background):
  # A few hundred ground-truth images per background, the background read from the border.
  images, attrs = [], []
  for i in range(300):
    objs, relation, _ = shapes.scene(5, "test", i)
    images.append(shapes.render(objs, 32, background))
    attrs.append(sm.parse_caption(shapes.caption_for(objs, relation)))
  result = sm.score_images(images, attrs, background="border")
  assert result["mean"]["exact"] == 1.0, result["mean"]
  # a wrong caption (every colour moved to the next palette colour) scores lower
  wrong = [dict(a, color=[(c + 1) % len(shapes.COLOR_NAMES) for c in a["color"]]) for a in attrs]
  bad = sm.score_images(images, wrong, background="border")["mean"]
  assert bad["exact"] == 0.0 and bad["color"] < 0.05, bad  # > 0: a shifted colour of one
  # object can be the other object's true colour


def test_grey_background_needs_the_background():
  objs, relation, _ = shapes.scene(5, "test", 0)
  img = shapes.render(objs, 32, "grey")
  attrs = sm.parse_caption(shapes.caption_for(objs, relation))
  assert sm.score_example(img, attrs, background=(128, 128, 128))["exact"] == 1.0
  # read as black, the whole grey image is one blob of no palette colour: nothing matches
  assert sm.score_example(img, attrs)["exact"] == 0.0
  with pytest.raises(ValueError, match="'corner'"):
    sm.score_example(img, attrs, background="corner")


@pytest.mark.parametrize("kind", ["normal", "sign"])
def test_noise_read_off_the_border_scores_below_chance(kind):
  # Off black, almost every noise pixel lies near some palette line: only one-colour
  # components that look like a shape count, so noise is no blob. "sign": every channel at
  # -1 or +1, what static clipping of garbage gives.
  _, attrs, _, _ = dataset(32, n=80)
  rng = np.random.default_rng(1)
  noise = np.clip(rng.normal(size=(80, 32, 32, 3)), -1, 1).astype(np.float32)
  if kind == "sign":
    noise = np.sign(noise)
  mean = sm.score_images(list(noise), attrs, background="border")["mean"]
  for attr, chance in sm.CHANCE.items():
    assert mean[attr] <= chance, (attr, mean[attr], chance)
  assert mean["exact"] == 0.0


@pytest.mark.parametrize("background", ["grey", "texture"])
def test_blurred_noisy_images_off_black_still_score_high(background):
  import scipy.ndimage

  rng = np.random.default_rng(0)
  images, attrs = [], []
  for i in range(60):
    objs, relation, _ = shapes.scene(11, "test", i)
    x = shapes.render(objs, 32, background) / 127.5 - 1.0
    x = scipy.ndimage.gaussian_filter(x, (0.5, 0.5, 0)) + 0.05 * rng.normal(size=x.shape)
    images.append(np.clip(x, -1, 1).astype(np.float32))
    attrs.append(sm.parse_caption(shapes.caption_for(objs, relation)))
  mean = sm.score_images(images, attrs, background="border")["mean"]
  assert mean["color"] >= 0.95 and mean["shape"] >= 0.9 and mean["exact"] >= 0.8, mean
