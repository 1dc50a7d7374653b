"""FID: Frechet distance, statistics files, preprocessing modes, InceptionV3 parity with pytorch-fid.

Goldens: tests/goldens/inception/ (README there). Live tests run where torch and pytorch-fid are
installed (`pip install torch pytorch-fid`) and are skipped otherwise.
"""

import importlib.util
import os

import numpy as np
import pytest

from imagen_jax.evals import convert_weights, fid, fid_preprocess, inception
from imagen_jax.evals.frechet import (
    FrechetStats,
    StreamingMoments,
    fid_from_statistics,
    frechet_distance,
)

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "goldens", "inception")


def _golden():
  return np.load(os.path.join(GOLDEN_DIR, "golden.npz"))


def _reference_module():
  """tests/goldens/inception/pytorch_fid_reference.py, imported by path (needs torch)."""
  pytest.importorskip("torch")
  pytest.importorskip("pytorch_fid")
  spec = importlib.util.spec_from_file_location(
      "pytorch_fid_reference", os.path.join(GOLDEN_DIR, "pytorch_fid_reference.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _random_stats(rng, dim, n):
  x = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) + rng.normal(size=dim)
  return x.mean(0), np.cov(x, rowvar=False)


# ---------------------------------------------------------------- Frechet distance


def test_fd_of_identical_statistics_is_zero():
  mu, sigma = _random_stats(np.random.default_rng(0), 64, 300)
  assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_fd_closed_form_for_diagonal_gaussians():
  # Diagonal covariances commute: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2.
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  s1, s2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
  assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("case", ["full", "lowrank"])
def test_fd_matches_pytorch_fid_golden(case):
  z = _golden()
  got = frechet_distance(
      z[f"fd_{case}_mu1"], z[f"fd_{case}_sigma1"], z[f"fd_{case}_mu2"], z[f"fd_{case}_sigma2"]
  )
  assert got == pytest.approx(float(z[f"fd_{case}_value"]), rel=1e-7)


def test_fd_reuses_the_references_square_root():
  # tr((S1 S2)^1/2) through the reference's S2^1/2 (computed once, kept on its statistics)
  # equals the S1^1/2 route; each point of a sweep then costs one eigvalsh, not two eigh.
  rng = np.random.default_rng(4)
  (mu1, s1), (mu2, s2), (mu3, s3) = (_random_stats(rng, 32, n) for n in (200, 20, 300))
  ref = FrechetStats(mu3, s3, 300, "clean")
  assert "sigma_sqrt" not in ref.__dict__
  for mu, s in ((mu1, s1), (mu2, s2)):
    plain = frechet_distance(mu, s, mu3, s3, sigma2_sqrt=None)
    other_route = frechet_distance(mu3, s3, mu, s)  # the square root of the other side
    got = fid_from_statistics(FrechetStats(mu, s, 10, "clean"), ref)
    assert got == pytest.approx(plain, rel=1e-12)
    assert got == pytest.approx(other_route, rel=1e-7)  # rank-deficient S1 (20 < 32): rounding
  np.testing.assert_allclose(ref.sigma_sqrt @ ref.sigma_sqrt, s3, atol=1e-9 * np.abs(s3).max())


def test_fd_matches_pytorch_fid_live():
  ref = _reference_module()
  rng = np.random.default_rng(3)
  mu1, s1 = _random_stats(rng, 48, 100)
  mu2, s2 = _random_stats(rng, 48, 100)
  want = ref.calculate_frechet_distance(mu1, s1, mu2, s2)
  assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-7)


def test_fd_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="shape mismatch"):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- statistics


def test_streaming_moments_equal_numpy_over_uneven_batches():
  rng = np.random.default_rng(4)
  # A large common offset: the naive sum(x x^T) - n mu mu^T would lose digits here.
  x = rng.standard_normal((103, 7)) + 1e4
  m = StreamingMoments(7)
  for a, b in [(0, 1), (1, 40), (40, 40), (40, 99), (99, 103)]:
    m.update(x[a:b])
  assert m.n == 103
  np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-13)
  np.testing.assert_allclose(m.covariance(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
  # Two accumulators (two hosts, say) merged give the same moments.
  a, b = StreamingMoments(7), StreamingMoments(7)
  a.update(x[:30])
  b.update(x[30:])
  a.merge(b)
  np.testing.assert_allclose(a.covariance(), m.covariance(), rtol=1e-9, atol=1e-9)


def test_stats_save_load_roundtrip_and_mode_checks(tmp_path):
  rng = np.random.default_rng(5)
  feats = rng.standard_normal((20, 6))
  tf_stats = FrechetStats.from_features(feats, mode="tf")
  path = str(tmp_path / "ref.npz")
  tf_stats.save(path)
  back = FrechetStats.load(path, expected_mode="tf")
  np.testing.assert_array_equal(back.sigma, tf_stats.sigma)
  assert (back.n, back.mode, back.feature) == (20, "tf", tf_stats.feature)
  assert fid_from_statistics(back, tf_stats) == pytest.approx(0.0, abs=1e-9)

  with pytest.raises(ValueError, match="'tf', expected 'clean'"):
    FrechetStats.load(path, expected_mode="clean")
  clean_stats = FrechetStats.from_features(feats, mode="clean")
  with pytest.raises(ValueError, match="preprocessing modes differ"):
    fid_from_statistics(tf_stats, clean_stats)
  other = FrechetStats.from_features(feats, mode="tf", feature="shapes-classifier/penultimate")
  with pytest.raises(ValueError, match="feature extractors differ"):
    fid_from_statistics(tf_stats, other)
  # A pytorch-fid style file (mu, sigma only) carries no mode: refused, not guessed.
  np.savez(str(tmp_path / "bare.npz"), mu=tf_stats.mu, sigma=tf_stats.sigma)
  with pytest.raises(ValueError, match="carry no mode"):
    FrechetStats.load(str(tmp_path / "bare.npz"))


# ---------------------------------------------------------------- preprocessing


def _tf_legacy_resize_loop(img, out):
  """Independent scalar implementation of TF1 ResizeBilinear(align_corners=False, legacy)."""
  h, w, _ = img.shape
  res = np.zeros((out, out, img.shape[2]))
  for i in range(out):
    sy = i * h / out
    y0 = int(np.floor(sy))
    y1 = min(y0 + 1, h - 1)
    fy = sy - y0
    for j in range(out):
      sx = j * w / out
      x0 = int(np.floor(sx))
      x1 = min(x0 + 1, w - 1)
      fx = sx - x0
      top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
      bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
      res[i, j] = top * (1 - fy) + bot * fy
  return res


def test_tf_mode_is_legacy_bilinear_then_128_scaling():
  img = np.random.default_rng(6).integers(0, 256, (1, 13, 9, 3), dtype=np.uint8)
  got = np.asarray(fid_preprocess.preprocess(img, "tf", size=20))
  want = (_tf_legacy_resize_loop(img[0].astype(np.float64), 20) - 128.0) / 128.0
  np.testing.assert_allclose(got[0], want, atol=1e-5)


def test_clean_mode_is_pil_bicubic_in_float():
  from PIL import Image

  img = np.random.default_rng(7).integers(0, 256, (1, 40, 30, 3), dtype=np.uint8)
  got = np.asarray(fid_preprocess.preprocess(img, "clean", size=24))
  ch = Image.fromarray(img[0, :, :, 1].astype(np.float32)).resize((24, 24), Image.BICUBIC)
  want = (np.clip(np.asarray(ch), 0, 255) - 128.0) / 128.0
  np.testing.assert_allclose(got[0, :, :, 1], want, atol=1e-6)


def test_pytorch_fid_mode_matches_torch_interpolate_live():
  torch = pytest.importorskip("torch")
  img = np.random.default_rng(8).integers(0, 256, (2, 17, 11, 3), dtype=np.uint8)
  got = np.asarray(fid_preprocess.preprocess(img, "pytorch_fid", size=29))
  x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255.0
  want = (
      2 * torch.nn.functional.interpolate(x, size=(29, 29), mode="bilinear", align_corners=False)
      - 1
  )
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=2e-6)


def test_modes_differ_and_are_identity_resizes_at_299():
  img = np.random.default_rng(9).integers(0, 256, (1, 50, 50, 3), dtype=np.uint8)
  outs = {m: np.asarray(fid_preprocess.preprocess(img, m, size=64)) for m in fid_preprocess.MODES}
  for a in fid_preprocess.MODES:
    assert outs[a].shape == (1, 64, 64, 3)
    for b in fid_preprocess.MODES:
      if a < b:
        assert np.abs(outs[a] - outs[b]).max() > 1e-2, (a, b)
  # At the network size the resize is the identity in every mode; only the scaling differs.
  big = np.random.default_rng(10).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
  x = big.astype(np.float32)
  for mode, want in [
      ("tf", (x - 128) / 128),
      ("clean", (x - 128) / 128),
      ("pytorch_fid", x / 127.5 - 1),
  ]:
    np.testing.assert_allclose(
        np.asarray(fid_preprocess.preprocess(big, mode)), want, atol=1e-5, err_msg=mode
    )


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="unknown FID preprocessing mode 'torch'"):
    fid_preprocess.check_mode("torch")
  with pytest.raises(ValueError, match="dtype float32"):
    fid_preprocess.check_images(np.zeros((1, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"shape \(1, 8, 8\)"):
    fid_preprocess.check_images(np.zeros((1, 8, 8), np.uint8))


# ---------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def torch_sd():
  """pytorch-fid layout random weights, regenerated from the golden's seed (not committed)."""
  return convert_weights.random_torch_state_dict(int(_golden()["weights_seed"]))


def test_converter_is_strict(torch_sd):
  sd = torch_sd
  assert sum(k.endswith("conv.weight") for k in sd) == 94  # the 94 conv+BN units
  with pytest.raises(ValueError, match="AuxLogits"):
    convert_weights.convert_state_dict({**sd, "AuxLogits.fc.weight": np.zeros((1000, 768))})
  partial = {k: v for k, v in sd.items() if not k.startswith("Mixed_7c.")}
  with pytest.raises(ValueError, match="lacks"):
    convert_weights.convert_state_dict(partial)
  with pytest.raises(ValueError, match="does not convert"):
    convert_weights.convert_state_dict({**sd, "fc.bias": np.zeros(1000, np.float32)})


def test_load_rejects_foreign_safetensors(tmp_path):
  from safetensors.numpy import save_file

  path = str(tmp_path / "x.safetensors")
  save_file({"params/fc/kernel": np.zeros((2048, 1008), np.float32)}, path)
  with pytest.raises(ValueError, match="not an FID InceptionV3 weights file"):
    inception.load_inception_variables(path)


# ---------------------------------------------------------------- network parity


@pytest.fixture(scope="module")
def computer(torch_sd):
  # batch_size 8 = the 8 fake devices: the batch is sharded, the 2 images padded to 8.
  variables = inception.flax_unflatten(convert_weights.convert_state_dict(torch_sd))
  return fid.FIDComputer(variables, mode="pytorch_fid", batch_size=8, progress=False)


def _rel_err(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


def test_inception_matches_pytorch_fid_golden(computer):
  z = _golden()
  images = z["images"]
  # Fed as two 1-image chunks: exercises re-batching and tail padding.
  got = computer.features([images[:1], images[1:]])
  assert got.shape == (2, inception.FEATURE_DIM)
  assert computer._runner.num_shards == 8
  print(f"InceptionV3 golden rel err {_rel_err(got, z['features']):.2e}")
  assert _rel_err(got, z["features"]) <= 1e-4


def test_inception_matches_pytorch_fid_live(computer, torch_sd, tmp_path):
  ref = _reference_module()
  import torch

  sd = torch_sd
  # The converter's real path: a .pth on disk, torch.load(weights_only=True), safetensors.
  pth, st = str(tmp_path / "w.pth"), str(tmp_path / "w.safetensors")
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, pth)
  convert_weights.main([f"--inception_pth={pth}", f"--out={st}"])
  from_file = inception.flax_flatten(inception.load_inception_variables(st))
  direct = convert_weights.convert_state_dict(sd)
  assert sorted(from_file) == sorted(direct)
  assert all(np.array_equal(from_file[k], direct[k]) for k in direct)
  images = np.random.default_rng(11).integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
  want = ref.pytorch_fid_features(ref.build_pytorch_fid_model(sd), images)
  # Through the statistics path this time: streaming float64 moments of our features.
  stats = computer.statistics(images)
  assert (stats.n, stats.mode) == (2, "pytorch_fid")
  print(
      f"InceptionV3 live rel err: mu {_rel_err(stats.mu, want.mean(0)):.2e}, sigma "
      f"{_rel_err(stats.sigma, np.cov(want, rowvar=False)):.2e}"
  )
  assert _rel_err(stats.mu, want.mean(0)) <= 1e-4
  assert _rel_err(stats.sigma, np.cov(want, rowvar=False)) <= 1e-4
