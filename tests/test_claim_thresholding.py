"""experiments/claim_thresholding.py: the claim table, the figure, a bad background named, and a
tiny end-to-end run (data on a grey background, the real trainer, the sweep) that a rerun reads
back."""

import json
import os
import subprocess
import sys

import pytest

from experiments import claim_thresholding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One CPU device in the children (not conftest's 8 fake ones): the command as a user runs it.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="")


def _row(w, mode, align, sat, fd):
  return {
      "weight": w,
      "threshold": mode,
      "alignment_color_shape": align,
      "shapes_exact": align / 2,
      "saturation_final": sat,
      "fd": fd,
      "settings": [],
      "key": f"w{w:g}_{mode}",
  }


ROWS = [
    _row(12.0, "dynamic", 0.80, 0.001, 0.5),
    _row(1.0, "static", 0.70, 0.010, 0.3),
    _row(12.0, "static", 0.60, 0.300, 2.0),
    _row(1.0, "dynamic", 0.72, 0.002, 0.2),
]


def test_claim_rows_are_ordered_and_keep_the_claim_fields():
  rows = claim_thresholding.claim_rows(ROWS)
  assert [(r["weight"], r["threshold"]) for r in rows] == [
      (1.0, "static"),
      (1.0, "dynamic"),
      (12.0, "static"),
      (12.0, "dynamic"),
  ]
  assert "settings" not in rows[0] and rows[0]["fd"] == 0.3
  json.dumps(rows)  # rows.jsonl holds them


def test_claim_table_puts_static_beside_dynamic_with_the_alignment_gap():
  table = claim_thresholding.claim_table(
      claim_thresholding.claim_rows(ROWS),
      background="grey",
      reference_saturation=0.0,
      note="Setting: x.",
  )
  assert "grey background" in table and "(real test images: 0)" in table
  assert "| w | align static | align dynamic | exact static |" in table
  assert "| 1 | 0.7 | 0.72 | 0.35 | 0.36 | 0.01 | 0.002 | 0.3 | 0.2 | +0.0200 |" in table
  assert "| 12 | 0.6 | 0.8 | 0.3 | 0.4 | 0.3 | 0.001 | 2 | 0.5 | +0.2000 |" in table
  # a mode missing at some w leaves its cells and the gap empty
  half = claim_thresholding.claim_table(
      claim_thresholding.claim_rows(ROWS[:1]), background="grey", reference_saturation=None, note=""
  )
  assert "| 12 |  | 0.8 |  | 0.4 |  | 0.001 |  | 0.5 |  |" in half


def test_plot_writes_a_png(tmp_path):
  path = tmp_path / "claim.png"
  claim_thresholding.plot(claim_thresholding.claim_rows(ROWS), str(path), "title")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bad_background_is_named_with_the_allowed_values(tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          os.path.join(REPO, "experiments", "claim_thresholding.py"),
          f"--outdir={tmp_path}",
          "--background=white",
      ],
      cwd=REPO,
      env=ENV,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode != 0
  assert "'white' is not one of ('black', 'grey', 'texture')" in proc.stderr
  assert not os.listdir(tmp_path)  # refused before building anything


@pytest.mark.slow
def test_tiny_run_trains_sweeps_and_reads_back_on_rerun(tmp_path):
  out = tmp_path / "out"
  cmd = [
      sys.executable,
      os.path.join(REPO, "experiments", "claim_thresholding.py"),
      f"--outdir={out}",
      "--config=configs/base64.py:tiny",
      "--config.train.progress_bar=false",
      # The tiny U-Net cut to one level (tests/test_train_trainer.py's CUT): the plumbing is the
      # claim, and the train step and both samplers compile in a fraction of the time.
      "--config.model.channel_mult=(1,)",
      "--config.model.attn_resolutions=(16,)",
      "--num_steps=4",
      "--weights=1,8",
      "--num_prompts=4",
      "--grid_prompts=2",
      "--cascade.stage1.num_steps=2",
      "--cascade.batch_size=4",
  ]
  run = lambda: subprocess.run(  # noqa: E731
      cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900
  )
  proc = run()
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "4 points sampled, 0 read back" in proc.stdout
  rows = [json.loads(line) for line in open(out / "rows.jsonl")]
  assert [(r["weight"], r["threshold"]) for r in rows] == [
      (1.0, "static"),
      (1.0, "dynamic"),
      (8.0, "static"),
      (8.0, "dynamic"),
  ]
  assert all(0.0 <= r["alignment_color_shape"] <= 1.0 and r["num_samples"] == 4 for r in rows)
  assert all(r["fd"] >= 0.0 and 0.0 <= r["saturation_final"] <= 1.0 for r in rows)
  table = (out / "table.md").read_text()
  assert "grey background" in table and "| 8 |" in table
  for name in ("claim_thresholding.png", "sweep/pareto.png", "sweep/samples.png"):
    assert (out / name).stat().st_size > 0, name
  # the data is the grey dataset, in its own directory; the trainer ran on it
  built = [d for d in os.listdir(out / "data" / "shapes") if not d.startswith(".")]
  assert built == ["r16_train64_test16_seed0_grey"]
  config = json.loads((out / "train" / "config.json").read_text())
  assert config["data"]["shapes_background"] == "grey"
  # a rerun trains nothing more and samples nothing
  again = run()
  assert again.returncode == 0, again.stderr[-3000:]
  assert "0 points sampled, 4 read back" in again.stdout
  assert (out / "table.md").read_text() == table
