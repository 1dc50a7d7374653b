"""experiments/guidance_gap.py: overrides, the gain table, and (slow) a tiny end-to-end run."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import guidance_gap  # noqa: E402


def test_overrides_parse_literals_and_refuse_unknown_fields():
  c = ml_collections.ConfigDict({"diffusion": {"target": "x0"}, "train": {"global_batch_size": 16}})
  c.lock()
  guidance_gap.apply_overrides(c, ["diffusion.target=eps", "train.global_batch_size=64"])
  assert c.diffusion.target == "eps" and c.train.global_batch_size == 64
  with pytest.raises(KeyError, match="batch"):  # a locked config refuses new fields
    guidance_gap.apply_overrides(c, ["train.batch=3"])
  with pytest.raises(ValueError, match="expected key=value"):
    guidance_gap.apply_overrides(c, ["train.global_batch_size"])


def test_gap_table_reports_the_best_gain_over_w1():
  rows = [
      dict(step=100, w=1.0, colour=0.70, held_colour=0.60),
      dict(step=100, w=3.0, colour=0.80, held_colour=0.65),
      dict(step=200, w=1.0, colour=0.85, held_colour=0.80),
      dict(step=200, w=3.0, colour=0.84, held_colour=0.78),
  ]
  table = guidance_gap.gap_table(rows, [1.0, 3.0], overrides=["text.drop_prob=0.3"])
  assert "text.drop_prob=0.3" in table
  assert "| 100 | 0.700 (0.600) | 0.800 (0.650) | +0.100 |" in table
  assert "| 200 | 0.850 (0.800) | 0.840 (0.780) | +0.000 |" in table


@pytest.mark.slow
def test_tiny_run_writes_a_row_per_step_and_weight(tmp_path):
  out = tmp_path / "out"
  subprocess.run(
      [
          sys.executable,
          os.path.join(REPO, "experiments", "guidance_gap.py"),
          f"--data_dir={tmp_path / 'data'}",
          f"--outdir={out}",
          "--variant=tiny",
          "--steps=4",
          "--eval_steps=0,4",
          "--weights=1,3",
          "--num_prompts=4",
          "--sample_steps=2",
      ],
      check=True,
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  rows = [json.loads(l) for l in open(out / "rows.jsonl")]
  assert [(r["step"], r["w"]) for r in rows] == [(0, 1.0), (0, 3.0), (4, 1.0), (4, 3.0)]
  assert all(0.0 <= r["colour"] <= 1.0 and r["n"] == 4 for r in rows)
  assert "best gain over w=1" in (out / "table.md").read_text()
