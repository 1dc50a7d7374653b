"""Guidance sweep end to end on tiny random stages: outputs, resume, the CLI."""

import csv
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from imagen_jax.evals import features, frechet, prompts, sweep, sweep_report
from imagen_jax.sampling import cascade
from tests import cascade_fixtures

STEPS = 2
NUM_PROMPTS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep")
  workdirs = cascade_fixtures.shared_tiny_cascade()
  model = cascade.Cascade.from_workdirs(workdirs)
  d = model.stages[1].config.data  # the tiny data config: 64 train / 16 test, seed 0
  data = prompts.shapes_test_prompts(
      str(root / "data"),
      32,
      num_train=int(d.num_train),
      num_test=int(d.num_test),
      seed=int(d.shapes_seed),
      limit=NUM_PROMPTS,
  )
  return root, workdirs, model, data


def _base():  # what the CLI builds from configs/cascade.py:shapes with the overrides below
  c = cascade.SamplingSettings
  return [c(num_steps=STEPS, guidance_weight=3.0), c(num_steps=STEPS, aug_level=0.1)]


def test_sweep_writes_outputs_and_resumes(setup, monkeypatch):
  root, workdirs, model, (prompts, attributes, reference) = setup
  outdir = str(root / "out")
  # Both weights guided (w != 1): one compiled sampler per threshold mode and stage.
  points = sweep.make_points([2.0, 4.0], ["dynamic", "static"])
  calls = []
  real_sample = model.sample
  monkeypatch.setattr(model, "sample", lambda *a, **k: calls.append(1) or real_sample(*a, **k))
  r = sweep.run_sweep(
      model,
      prompts,
      _base(),
      points,
      outdir,
      sweep_stage=0,
      attributes=attributes,
      reference_images=reference,
      batch_size=8,
      progress=False,
  )
  assert (r.computed, r.cached, len(calls)) == (4, 0, 4)
  paths = sweep_report.write_outputs(r, outdir, "test sweep")
  assert all(os.path.getsize(p) > 0 for p in paths.values())
  with open(paths["csv"]) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 4 and {r_["threshold"] for r_ in rows} == {"dynamic", "static"}
  for row in rows:
    assert 0.0 <= float(row["saturation_final"]) <= 1.0
    assert float(row["fd"]) >= 0.0 and row["fd_feature"].startswith("random-conv")
    assert 0.0 <= float(row["alignment_color_shape"]) <= 1.0
  md = open(paths["md"]).read()
  assert features.RANDOM_CONV_LABEL in md and "not FID" in md and "Real reference images" in md
  assert r.reference_saturation > 0.5  # shapes: pure colours on black
  assert r.reference_saturation_upper == 0.0  # ... none of them clipped at the top
  assert all(
      0.0 <= float(row["saturation_upper_final"]) <= float(row["saturation_final"]) for row in rows
  )
  with open(paths["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with PIL.Image.open(paths["grid"]) as grid:  # 4 points as columns beside the prompt labels
    assert grid.size[0] == 200 + 4 * (96 + 4) + 4
  # Each point: uint8 samples per stage, prompts, metrics; no temporary folders left.
  names = sorted(os.listdir(os.path.join(outdir, "points")))
  assert len(names) == 4 and not any(n.startswith(".tmp") for n in names)
  assert not [n for n in os.listdir(outdir) if n.startswith(".tmp")]
  with np.load(os.path.join(outdir, "points", names[0], "samples.npz")) as z:
    assert z["stage1"].shape == (NUM_PROMPTS, 16, 16, 3) and z["stage1"].dtype == np.uint8
    assert z["stage2"].shape == (NUM_PROMPTS, 32, 32, 3)
  mtimes = {n: os.path.getmtime(os.path.join(outdir, "points", n, "metrics.json")) for n in names}

  # Resume: nothing is sampled again, rows are identical.
  r2 = sweep.run_sweep(
      model,
      prompts,
      _base(),
      points,
      outdir,
      sweep_stage=0,
      attributes=attributes,
      reference_images=reference,
      batch_size=8,
      progress=False,
  )
  assert (r2.computed, r2.cached, len(calls)) == (0, 4, 4)
  assert [x["fd"] for x in r2.rows] == [x["fd"] for x in r.rows]
  # A changed setting is a new point (the key hashes the settings), not a stale cache hit.
  ident = {"settings": [1]}
  assert sweep.point_key(points[0], ident) != sweep.point_key(points[0], {"settings": [2]})

  # The CLI on the same outdir and settings: every point comes from the cache.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [
          sys.executable,
          os.path.join(cascade_fixtures.REPO, "experiments", "guidance_sweep.py"),
          f"--workdirs={workdirs[0]},{workdirs[1]}",
          "--weights=2,4",
          "--thresholds=dynamic,static",
          f"--num_prompts={NUM_PROMPTS}",
          "--batch_size=8",
          f"--data_dir={root / 'data'}",
          f"--outdir={outdir}",
          f"--config.stage1.num_steps={STEPS}",
          f"--config.stage2.num_steps={STEPS}",
      ],
      capture_output=True,
      text=True,
      env=env,
      cwd=cascade_fixtures.REPO,
      timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "0 points sampled, 4 read from cache" in out.stdout, out.stdout[-2000:]
  for n, t in mtimes.items():
    assert os.path.getmtime(os.path.join(outdir, "points", n, "metrics.json")) == t


def test_random_conv_fd_is_labelled_and_separates_distributions():
  rng = np.random.default_rng(0)
  feats = features.RandomConvFeatures(batch_size=8)
  a = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  b = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  black = np.zeros_like(a)
  black[:, 8:24, 8:24, 0] = 255
  sa, sb, sk = feats.statistics(a), feats.statistics(b), feats.statistics(black)
  assert sa.feature != frechet.INCEPTION_FEATURE
  assert frechet.fid_from_statistics(sa, sb) < frechet.fid_from_statistics(sa, sk)
  inception_like = frechet.FrechetStats(sa.mu, sa.sigma, sa.n, "tf")
  with pytest.raises(ValueError, match="differ"):
    frechet.fid_from_statistics(sa, inception_like)


def test_saturation_and_bad_points_are_named():
  x = np.array([-1.0, -0.995, 0.0, 0.5, 0.99, 0.2, 0.3, 0.1])
  assert sweep.saturation_fraction(x) == pytest.approx(3 / 8)
  assert sweep.saturation_fraction(x, upper_only=True) == pytest.approx(1 / 8)
  with pytest.raises(ValueError, match="'clip'"):
    sweep.make_points([1.0], ["clip"])
  with pytest.raises(ValueError, match="0.5"):
    sweep.make_points([0.5], ["static"])
  with pytest.raises(ValueError, match="sweep_stage 2"):
    sweep.point_settings(_base(), 2, sweep.SweepPoint(1.0, "static"))


def test_sweep_negative_prompt_moves_guided_points_only(setup, tmp_path):
  # eps~ = w eps(c) + (1 - w) eps(neg): the negative prompt's branch has weight 0 at w = 1, so
  # those samples equal the null-text sweep's; at w = 3 they move.
  _, _, model, (prompts, _, _) = setup
  points = sweep.make_points([1.0, 3.0], ["dynamic"])
  base = _base()[:1]  # the base stage alone: a fast one-stage prefix
  results, samples = {}, {}
  for name, neg in (("plain", None), ("neg", "a blue square")):
    outdir = str(tmp_path / name)
    r = sweep.run_sweep(
        model,
        prompts,
        base,
        points,
        outdir,
        sweep_stage=0,
        batch_size=8,
        progress=False,
        negative_prompt=neg,
    )
    results[name] = {row["weight"]: row for row in r.rows}
    for row in r.rows:
      with np.load(os.path.join(outdir, "points", row["key"], "samples.npz")) as z:
        samples[name, row["weight"]] = z["stage1"]
    md = open(sweep_report.write_outputs(r, outdir, "neg")["md"]).read()
    assert ("Negative prompt" in md) == (neg is not None) and (neg is None or repr(neg) in md)
  np.testing.assert_array_equal(samples["neg", 1.0], samples["plain", 1.0])
  assert np.abs(samples["neg", 3.0].astype(int) - samples["plain", 3.0]).max() > 0
  for w in (1.0, 3.0):  # recorded in the row, and a point of its own (another key)
    assert results["neg"][w]["negative_prompt"] == "a blue square"
    assert results["plain"][w]["negative_prompt"] is None
    assert results["neg"][w]["key"] != results["plain"][w]["key"]
