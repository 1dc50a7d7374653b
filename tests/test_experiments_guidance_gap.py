"""experiments/guidance_gap.py: the checkpoint plan, the gain table, and a tiny end-to-end run
through the real trainer's command line."""

import json
import os
import subprocess
import sys

import pytest

from experiments import guidance_gap
from imagen_jax import cli_runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_checkpoint_plan_keeps_a_checkpoint_at_every_eval_step():
  plan = guidance_gap.checkpoint_plan(["1500", "2000", "2500"], 2500)
  assert plan == {"train.num_steps": 2500, "train.ckpt_every": 500, "train.max_to_keep": 6}
  plan = guidance_gap.checkpoint_plan([3, 7], 10)
  assert plan["train.ckpt_every"] == 1 and plan["train.max_to_keep"] == 11
  with pytest.raises(ValueError, match=r"\[1, train.num_steps=10\]"):
    guidance_gap.checkpoint_plan([0, 10], 10)
  with pytest.raises(ValueError, match="num_steps=10"):
    guidance_gap.checkpoint_plan([12], 10)


def test_overrides_become_config_flags():
  cmd = cli_runner.main_command(
      "configs/base64.py:tiny",
      "/w",
      {
          "train.num_steps": 4,
          "model.channel_mult": (1, 2),
          "diffusion.target": "eps",
          "train.progress_bar": False,
          "optim.learning_rate": 1e-3,
      },
  )
  assert cmd[1:5] == ["-m", "imagen_jax.train", "--config=configs/base64.py:tiny", "--workdir=/w"]
  assert cmd[5:] == [
      "--config.train.num_steps=4",
      "--config.model.channel_mult=(1, 2)",
      "--config.diffusion.target=eps",
      "--config.train.progress_bar=false",
      "--config.optim.learning_rate=0.001",
  ]
  with pytest.raises(ValueError, match="train.x=None"):
    cli_runner.override_flag("train.x", None)


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
def test_tiny_run_trains_with_the_trainer_and_writes_a_row_per_step_and_weight(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run(
      [
          sys.executable,
          os.path.join(REPO, "experiments", "guidance_gap.py"),
          f"--outdir={out}",
          "--config=configs/base64.py:tiny",
          "--config.train.num_steps=4",
          "--config.train.progress_bar=false",
          # The tiny U-Net cut to one level (tests/test_train_trainer.py's CUT): the plumbing is
          # the claim, and the train step and both samplers compile in a fraction of the time.
          "--config.model.channel_mult=(1,)",
          "--config.model.attn_resolutions=(16,)",
          "--eval_steps=2,4",
          "--weights=1,3",
          "--num_prompts=4",
          "--sample_steps=2",
      ],
      cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(out / "rows.jsonl")]
  assert [(r["step"], r["w"]) for r in rows] == [(2, 1.0), (2, 3.0), (4, 1.0), (4, 3.0)]
  assert all(0.0 <= r["colour"] <= 1.0 and r["n"] == 4 for r in rows)
  table = (out / "table.md").read_text()
  assert "best gain over w=1" in table and "train.num_steps=4" in table
  # The real trainer ran: its metrics log and a checkpoint at each eval step.
  assert (out / "train" / "metrics.jsonl").exists()
  assert {"2", "4"} <= set(os.listdir(out / "train" / "checkpoints"))
