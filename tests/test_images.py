"""imagen_jax.images: one rounding rule, grids, labelled sheets; evals.image_metrics."""

import numpy as np
import pytest

from imagen_jax import images
from imagen_jax.evals import image_metrics


def test_to_uint8_rounds_half_up_and_clips():
  # x = 0 sits exactly between levels 127 and 128: half up gives 128.
  assert images.to_uint8(np.float32(0.0)) == 128
  x = np.linspace(-1.2, 1.2, 100_001, dtype=np.float32)
  u8 = images.to_uint8(x)
  want = np.clip(np.floor((x.astype(np.float64) + 1) * 127.5 + 0.5), 0, 255)
  assert np.mean(u8 == want) > 0.999  # float32 vs float64 differ only at exact halves
  assert (np.diff(u8.astype(int)) >= 0).all()  # monotone
  np.testing.assert_array_equal(
      images.to_uint8(np.array([-1.5, -1.0, 0.0, 1.0, 7.0])), [0, 0, 128, 255, 255]
  )
  levels = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(images.to_uint8(images.from_uint8(levels)), levels)
  with pytest.raises(ValueError, match="dtype uint8"):
    images.to_uint8(levels)
  with pytest.raises(ValueError, match="dtype float32"):
    images.from_uint8(levels.astype(np.float32))


def test_image_grid_layout_and_gaps():
  batch = np.stack([np.full((4, 4, 3), v, np.float32) for v in (-1.0, 0.0, 1.0, -1.0, 1.0)])
  grid = images.image_grid(batch)  # 5 images -> 3 columns x 2 rows, 1 px white gaps
  assert grid.shape == (2 * 5 - 1, 3 * 5 - 1, 3) and grid.dtype == np.uint8
  assert (grid[:4, :4] == 0).all() and (grid[:4, 5:9] == 128).all() and (grid[:4, 10:] == 255).all()
  assert (grid[4] == 255).all() and (grid[:, 4] == 255).all()  # the gaps
  assert (grid[5:, 10:] == 255).all()  # the empty sixth cell stays white
  u8 = images.image_grid(images.to_uint8(batch), ncols=5, gap=0)
  assert u8.shape == (4, 20, 3)
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    images.image_grid(np.zeros((4, 4, 3)))


def test_labelled_grid_size_and_tiles():
  red = np.zeros((8, 8, 3), np.uint8)
  red[..., 0] = 255
  sheet = images.labelled_grid(
      [[red, np.zeros((8, 8, 3), np.float32)]],
      ["a red square"],
      ["a", "b"],
      cell=32,
      label_width=100,
      pad=4,
  )
  assert sheet.size == (100 + 2 * (32 + 4) + 4, 18 + 32 + 4 + 4)
  px = np.asarray(sheet)
  assert tuple(px[18 + 4 + 16, 100 + 4 + 16]) == (255, 0, 0)  # first tile, nearest-resized
  assert tuple(px[18 + 4 + 16, 100 + 4 + 36 + 16]) == (128, 128, 128)  # float 0 -> 128
  with pytest.raises(ValueError, match="1 rows of images but 2 row labels"):
    images.labelled_grid([[red]], ["a", "b"], ["a"])


def test_psnr_and_edge_sharpness():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  b = a.copy()
  b[0, 0, 0, 0] ^= 1  # one value off by one in the first image
  mse0 = 1.0 / (16 * 16 * 3)
  want = np.mean([10 * np.log10(255.0**2 / mse0), 10 * np.log10(255.0**2 / 1e-10)])
  assert image_metrics.psnr(a, b) == pytest.approx(want)
  step = np.zeros((1, 16, 16, 3), np.uint8)
  step[:, :, 8:] = 255
  blur = np.zeros((1, 16, 16, 3), np.uint8)
  blur[:, :, 8:] = 255
  blur[:, :, 7] = 128
  assert image_metrics.edge_sharpness(step) > image_metrics.edge_sharpness(blur)
  with pytest.raises(ValueError, match="uint8"):
    image_metrics.psnr(a.astype(np.float32), b)


def test_save_grid_writes_the_grid_as_png(tmp_path):
  import PIL.Image

  batch = np.random.default_rng(0).uniform(-1, 1, (5, 4, 6, 3)).astype(np.float32)
  path = images.save_grid(batch, str(tmp_path / "grid.png"), ncols=2)
  np.testing.assert_array_equal(np.asarray(PIL.Image.open(path)), images.image_grid(batch, 2))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]  # no temporary left
