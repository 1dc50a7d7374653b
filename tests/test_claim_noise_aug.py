"""experiments/claim_noise_aug.py: aug-level parsing, the config comparison, and a tiny end-to-end
run (random base / with-aug SR stages as the demo's, the without-aug SR stage trained by the real
trainer) that a rerun does not recompute."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import app

from experiments import claim_noise_aug
from imagen_jax import cli_runner
from tests import cascade_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One CPU device in the children (not conftest's 8 fake ones): the command as a user runs it,
# and an unsharded train step and samplers compile faster.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="")
# The tiny cascade of cascade_fixtures (16x16 base -> 32x32 SR), with the SR stage's data at its
# size, a 2-step budget and its Efficient U-Net cut to one level (the plumbing is the claim; the
# train step and the samplers compile in a fraction of the time). The with-aug stage is written
# with the same config.
SR = {
    "image_size": 32,
    "lowres_size": 16,
    "data.resolution": 32,
    "train.num_steps": 2,
    "train.progress_bar": False,
    "model.channels": (8,),
    "model.strides": (2,),
    "model.num_res_blocks": (1,),
    "model.self_attention": (False,),
    "model.text_cross_attention": (True,),
}
SR_FLAGS = ["--sr_config=configs/sr256.py:tiny"] + [
    cli_runner.override_flag(k, v).replace("--config.", "--sr_config.") for k, v in SR.items()
]


def test_aug_levels_are_checked_and_a_bad_one_is_named():
  assert claim_noise_aug.parse_aug_levels(["0", "0.1", "0.5", "1"]) == [0.0, 0.1, 0.5, 1.0]
  with pytest.raises(ValueError, match=r"'1\.5' is outside \[0, 1\]"):
    claim_noise_aug.parse_aug_levels(["0", "1.5"])
  with pytest.raises(ValueError, match=r"'-0\.1' is outside \[0, 1\]"):
    claim_noise_aug.parse_aug_levels(["-0.1"])
  with pytest.raises(ValueError, match="'x' is not a number"):
    claim_noise_aug.parse_aug_levels(["x"])
  with pytest.raises(ValueError, match="'0.1' is given twice"):
    claim_noise_aug.parse_aug_levels(["0.1", "0.1"])


def test_config_differences_ignore_the_aug_range_only():
  a = {
      "model": {"channels": [8, 16]},
      "diffusion": {"aug_level": [0.0, 0.5], "target": "x0"},
      "train": {"num_steps": 2000, "seed": 0},
  }
  b = json.loads(json.dumps(a))
  b["diffusion"]["aug_level"] = [0.0, 0.0]
  assert claim_noise_aug.config_differences(a, b) == []
  b["diffusion"]["target"] = "eps"
  b["train"]["num_steps"] = 100
  assert claim_noise_aug.config_differences(a, b) == [
      "diffusion.target: 'x0' vs 'eps'",
      "train.num_steps: 2000 vs 100",
  ]


def test_the_demo_sr_stage_is_checked_before_training_the_no_aug_one():
  demo = {
      "model": {"channels": [96, 128]},
      "diffusion": {"aug_level": [0.0, 0.5], "target": "x0"},
      "train": {"num_steps": 2000},
  }
  config = json.loads(json.dumps(demo))
  claim_noise_aug.check_demo_sr(demo, config, 2000)
  claim_noise_aug.check_demo_sr(demo, config, 500)  # a budget difference is only reported
  config["model"]["channels"] = [64, 128]
  with pytest.raises(app.UsageError, match=r"model: \{'channels': \[96, 128\]\} vs"):
    claim_noise_aug.check_demo_sr(demo, config, 2000)
  demo["diffusion"]["aug_level"] = [0.0, 0.0]
  with pytest.raises(app.UsageError, match=r"trained without augmentation"):
    claim_noise_aug.check_demo_sr(demo, demo, 2000)


def test_cached_sample_sets_are_reused_only_under_their_key(tmp_path):
  path, counter = str(tmp_path / "s.npz"), {"sample_sets": 0}
  calls = []

  def compute(value):
    calls.append(value)
    return np.full((2, 4, 4, 3), value, np.uint8)

  a = claim_noise_aug.cached_npz(path, "k1", lambda: compute(1), counter)
  b = claim_noise_aug.cached_npz(path, "k1", lambda: compute(2), counter)
  assert calls == [1] and np.array_equal(a, b) and counter["sample_sets"] == 1
  c = claim_noise_aug.cached_npz(path, "k2", lambda: compute(3), counter)  # other settings
  assert calls == [1, 3] and c.max() == 3 and counter["sample_sets"] == 2


def test_table_has_a_line_per_stage_and_level_and_the_references():
  row = dict(colour=0.9, shape=0.8, exact=0.5, edge_p99=80.0, real_psnr_db=25.0, real_edge_p99=75)
  rows = [
      dict(row, stage="with_aug", aug=0.0, held_exact=0.25),
      dict(row, stage="without_aug", aug=0.3, held_exact=None),
  ]
  scores = dict(colour=1.0, shape=1.0, exact=1.0, held_exact=1.0)
  refs = {
      "base_samples": scores,
      "base_samples_bicubic": dict(scores, edge_p99=60.0),
      "real": dict(scores, edge_p99=99.5),
      "real_lowres_bicubic": {"psnr_db": 31.0, "edge_p99": 59.0},
  }
  table = claim_noise_aug.table(rows, refs, {"num_prompts": 2})
  assert "| with aug | 0 | 0.500 | 0.900 | 0.800 | 0.250 | 80.0 | 25.00 | 75.0 |" in table
  assert "| without aug | 0.3 | 0.500 | 0.900 | 0.800 | - | 80.0 | 25.00 | 75.0 |" in table
  assert "PSNR 31.00 dB" in table and '"num_prompts": 2' in table


def test_a_bad_aug_level_on_the_command_line_is_a_one_line_error(tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          os.path.join(REPO, "experiments", "claim_noise_aug.py"),
          f"--outdir={tmp_path / 'out'}",
          "--aug_levels=0,0.1,1.5",
      ],
      cwd=REPO,
      env=ENV,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "'1.5' is outside [0, 1]" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "out").exists()  # refused before anything is written


def _run(out, demo):
  proc = subprocess.run(
      [
          sys.executable,
          os.path.join(REPO, "experiments", "claim_noise_aug.py"),
          f"--outdir={out}",
          f"--demo_dir={demo}",
          *SR_FLAGS,
          "--cascade.stage1.num_steps=2",
          "--cascade.stage2.num_steps=2",
          "--num_prompts=4",
          "--aug_levels=0,0.5",
          "--grid_rows=2",
      ],
      cwd=REPO,
      env=ENV,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _mtimes(out):
  files = [out / "rows.jsonl", out / "base_samples.npz", *sorted((out / "samples").iterdir())]
  return {str(f): f.stat().st_mtime_ns for f in files}


@pytest.mark.slow  # a trainer run, 9 sample sets and a rerun: 1-1.5 min on a loaded 2-core host
def test_tiny_run_trains_the_no_aug_stage_writes_every_row_and_resumes(tmp_path):
  demo, out = tmp_path / "demo", tmp_path / "out"
  # The demo's stages: random weights (sampling does not care), the SR one trained "with aug".
  base = cascade_fixtures.tiny_config("base64")
  with base.unlocked():  # one level, like the SR stage
    base.model.channel_mult, base.model.attn_resolutions = (1,), (16,)
  cascade_fixtures.write_stage(str(demo / "base"), base)
  sr = cascade_fixtures.tiny_config("sr256")
  with sr.unlocked():
    for path, value in SR.items():
      *parents, leaf = path.split(".")
      block = sr
      for p in parents:
        block = block[p]
      block[leaf] = value
  cascade_fixtures.write_stage(str(demo / "sr"), sr, seed=1, step=2)

  stdout = _run(out, demo)
  rows = [json.loads(line) for line in open(out / "rows.jsonl")]
  assert [(r["stage"], r["aug"]) for r in rows] == [
      ("with_aug", 0.0),
      ("with_aug", 0.5),
      ("without_aug", 0.0),
      ("without_aug", 0.5),
  ]
  for r in rows:
    assert r["n"] == 4 and all(0.0 <= r[m] <= 1.0 for m in ("colour", "shape", "exact"))
    assert r["edge_p99"] >= 0.0 and r["real_psnr_db"] > 0.0
  # The real trainer made the without-aug stage: 2 steps, aug range (0, 0), otherwise the same.
  noaug = json.loads((out / "sr_noaug" / "config.json").read_text())
  assert noaug["diffusion"]["aug_level"] == [0.0, 0.0]
  assert (out / "sr_noaug" / "metrics.jsonl").exists()
  assert claim_noise_aug.trained_step(str(out / "sr_noaug")) == 2
  assert not (out / "base").exists() and not (out / "sr_aug").exists()  # the demo's were used
  table = (out / "table.md").read_text()
  assert "| with aug | 0.5 |" in table and "| without aug | 0 |" in table
  assert '"sr_stage_differences": []' in table
  for png in ("aug_sweep.png", "grid_with_aug.png", "grid_without_aug.png"):
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The sampling aug level reaches the SR stage: its random network's outputs move with it.
  with (
      np.load(out / "samples" / "with_aug_aug0.npz") as a,
      np.load(out / "samples" / "with_aug_aug0.5.npz") as b,
  ):
    assert a["images"].shape == (4, 32, 32, 3) and not np.array_equal(a["images"], b["images"])
  assert "computed 9 sample sets and 4 rows" in stdout  # base + 2 stages x 2 levels x 2 inputs

  # A rerun reuses everything: no sample set, row or training step is recomputed.
  before = _mtimes(out)
  stdout = _run(out, demo)
  assert "computed 0 sample sets and 0 rows" in stdout
  assert "training the" not in stdout
  assert _mtimes(out) == before
