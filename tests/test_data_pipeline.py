"""The grain pipeline: stage shapes, host slices, start positions, global batches."""

import sys

import jax
import numpy as np
import pytest

from imagen_jax.data import pipeline, preprocess, shapes

L = 72  # longer than the longest shapes caption (63 bytes)


def byte_tokenizer(texts):
  """Stand-in for the text package's tokenizer: UTF-8 bytes + 1, 0 = padding."""
  ids = np.zeros((len(texts), L), np.int32)
  mask = np.zeros((len(texts), L), bool)
  for i, text in enumerate(texts):
    b = list(text.encode("utf-8"))[:L]
    ids[i, : len(b)] = np.asarray(b) + 1
    mask[i, : len(b)] = True
  return ids, mask


def decode(ids, mask):
  return bytes((ids[mask] - 1).astype(np.uint8).tolist()).decode()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("shapes64")
  shapes.build_shapes(d, 64, num_train=32, num_test=16, seed=0)
  return str(d)


def config(data_dir, **kw):
  return pipeline.default_data_config(
      "shapes", data_dir=data_dir, resolution=64, num_train=32, num_test=16, **kw
  )


def loader(
    data_dir,
    *,
    image_size=64,
    lowres_size=None,
    batch=4,
    seed=0,
    index=0,
    count=1,
    tokenizer=byte_tokenizer,
    start=0,
    **kw,
):
  return pipeline.make_loader(
      config(data_dir, **kw),
      image_size=image_size,
      lowres_size=lowres_size,
      global_batch_size=batch,
      tokenizer=tokenizer,
      seed=seed,
      process_index=index,
      process_count=count,
      start_index=start,
  )


@pytest.mark.parametrize(
    "image_size,lowres_size,crop,out_hw,low_hw",
    [
        (64, None, 0, 64, None),  # base stage at the data's resolution
        (32, None, 0, 32, None),  # base stage, anti-aliased downsample
        (64, 16, 0, 64, 16),  # SR stage 16 -> 64
        (64, 16, 32, 32, 8),  # SR1024-style crop training: 32 crops paired with their 8 crops
    ],
)
def test_batches_have_stage_shapes(data_dir, image_size, lowres_size, crop, out_hw, low_hw):
  it = loader(data_dir, image_size=image_size, lowres_size=lowres_size, sr_crop_size=crop)
  batch = next(it)
  assert batch["image"].shape == (4, out_hw, out_hw, 3)
  assert batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["image"].min() == -1.0  # black background maps to -1
  assert batch["text_ids"].shape == (4, L) and batch["text_ids"].dtype == np.int32
  assert batch["text_mask"].shape == (4, L) and batch["text_mask"].dtype == bool
  assert "caption" not in batch  # strings never go to devices
  if low_hw is None:
    assert "lowres" not in batch
    return
  low = batch["lowres"]
  assert low.shape == (4, low_hw, low_hw, 3) and low.dtype == np.float32
  assert -1.0 <= low.min() and low.max() <= 1.0
  # The low-res image is the anti-aliased downsample of the high-res one (up to rounding
  # and, for crops, the filter's reach across the crop border).
  hi = (batch["image"] + 1) * 127.5
  f = out_hw // low_hw
  box = hi.reshape(4, low_hw, f, low_hw, f, 3).mean(axis=(2, 4))
  err = np.abs(box - (low + 1) * 127.5)
  inner = err[:, 1:-1, 1:-1] if crop else err
  assert np.median(inner) < 3.0, np.median(inner)


def test_sr_lowres_matches_pil_downsample_exactly(data_dir):
  batch = next(loader(data_dir, image_size=64, lowres_size=32, keep_caption=True))
  for hi, low in zip(batch["image"], batch["lowres"]):
    hi8 = np.round((hi + 1) * 127.5).astype(np.uint8)
    expect = preprocess.resize(hi8, 32, 32, "bicubic")
    np.testing.assert_allclose((low + 1) * 127.5, expect, atol=1e-3)


def test_captions_match_attributes_through_the_loader(data_dir):
  it = loader(
      data_dir, keep_caption=True, extra_keys=("color", "shape", "size", "num_objects", "relation")
  )
  batch = next(it)
  for i in range(4):
    caption = str(batch["caption"][i])
    assert decode(batch["text_ids"][i], batch["text_mask"][i]) == caption
    n = int(batch["num_objects"][i])
    for c, s, z in zip(batch["color"][i][:n], batch["shape"][i][:n], batch["size"][i][:n]):
      assert shapes.object_phrase(dict(color=c, shape=s, size=z)) in caption


def test_two_hosts_see_disjoint_examples_covering_the_split(data_dir):
  seen = []
  for index in (0, 1):
    it = loader(data_dir, batch=8, index=index, count=2, repeat=False, extra_keys=("index",))
    ids = np.concatenate([b["index"] for b in it])
    assert len(ids) == 16 and len(set(ids.tolist())) == 16
    seen.append(set(ids.tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(32))


def test_a_loader_started_at_a_position_yields_the_next_batch(data_dir):
  k = 3
  it = loader(data_dir, seed=5, crop="random", sr_crop_size=32, lowres_size=16)
  for _ in range(k):
    next(it)
  assert it.position == k * 4  # global examples read (the checkpoint's data position)
  expected = next(it)
  fresh = loader(data_dir, seed=5, crop="random", sr_crop_size=32, lowres_size=16, start=k * 4)
  got = next(fresh)
  assert sorted(got) == sorted(expected)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key])


def test_seeded_shuffle_and_repeat(data_dir):
  a = [next(it)["text_ids"] for it in [loader(data_dir, seed=1)] for _ in range(10)]
  b = [next(it)["text_ids"] for it in [loader(data_dir, seed=1)] for _ in range(10)]
  c = next(loader(data_dir, seed=2))["text_ids"]
  np.testing.assert_array_equal(np.stack(a), np.stack(b))  # 40 > 32 records: it repeats
  assert not np.array_equal(a[0], c)


def test_embedding_lookup_replaces_tokens(data_dir):
  def lookup(texts):
    ids, mask = byte_tokenizer(texts)
    return np.repeat(ids[..., None], 3, -1).astype(np.float32), mask

  it = pipeline.make_loader(
      config(data_dir),
      image_size=64,
      global_batch_size=4,
      seed=0,
      process_index=0,
      process_count=1,
      embedding_lookup=lookup,
  )
  batch = next(it)
  assert batch["text_emb"].shape == (4, L, 3) and "text_ids" not in batch


def test_to_global_batch_shards_over_batch_axes(data_dir):
  batch = next(loader(data_dir, batch=8, lowres_size=32, keep_caption=True))
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  out = pipeline.to_global_batch(batch, mesh, ("data", "fsdp"))
  assert "caption" not in out
  assert out["image"].shape == (8, 64, 64, 3)
  assert out["image"].sharding.spec[0] == ("data", "fsdp")
  assert len(out["image"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(out["text_ids"]), batch["text_ids"])
  with pytest.raises(ValueError, match="'model'"):
    pipeline.to_global_batch(batch, mesh, ("data", "model"))


def test_bad_settings_are_named(data_dir):
  with pytest.raises(ValueError, match="global_batch_size 5"):
    loader(data_dir, batch=5, count=2)
  with pytest.raises(ValueError, match="crop 'middle'"):
    loader(data_dir, crop="middle")
  with pytest.raises(ValueError, match="lowres_size 24"):
    loader(data_dir, lowres_size=24)
  with pytest.raises(KeyError, match="no_such_field"):
    config(data_dir, no_such_field=1)
  with pytest.raises(KeyError, match="'caption_text'"):
    next(loader(data_dir, caption_key="caption_text"))


def test_no_tensorflow_loaded():
  assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("keep", [False, True])
def test_embedding_lookup_by_example_id(data_dir, keep):
  seen = []

  def lookup(ids):  # stands in for text.cache.TextEmbeddingCache.get_batch
    seen.extend(ids)
    return np.zeros((len(ids), 5, 2), np.float32), np.ones((len(ids), 5), bool)

  extra = ("index",) if keep else ()
  it = pipeline.make_loader(
      config(data_dir, embedding_id_key="index", keep_caption=True, extra_keys=extra),
      image_size=64,
      global_batch_size=4,
      seed=0,
      process_index=0,
      process_count=1,
      embedding_lookup=lookup,
  )
  batch = next(it)
  assert all(isinstance(i, int) for i in seen) and len(seen) == 4
  assert ("index" in batch) == keep
  src = pipeline.open_data_source(config(data_dir), build=False)
  by_index = {int(src[i]["index"]): src[i]["caption"].decode() for i in range(len(src))}
  assert [by_index[i] for i in seen] == [str(c) for c in batch["caption"]]
