"""experiments/claim_encoder.py: the effects and the table on hand-made rows, its flag errors,
and a tiny end-to-end run with the pretrained encoder through the real trainer, then a rerun that
trains nothing."""

import json
import os
import re
import subprocess
import sys

import pytest

from experiments import claim_encoder as ce
from imagen_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(encoder, width, seed, binding, w=3.0):
  r = dict(run=ce.run_name(encoder, width, seed), encoder=encoder, width=width, seed=seed, w=w)
  return dict(r, **{m: binding for m in ce.METRICS}, train_s=1.0)


def test_effects_are_the_mean_differences_over_seeds_then_the_other_factor():
  # binding by (encoder, width), two seeds each: random half .2/.4, full .5/.5;
  # pretrained half .6/.8, full .7/.9.
  cells = {
      (ce.RANDOM, "half"): (0.2, 0.4),
      (ce.RANDOM, "full"): (0.5, 0.5),
      (ce.PRETRAINED, "half"): (0.6, 0.8),
      (ce.PRETRAINED, "full"): (0.7, 0.9),
  }
  rows = [_row(e, s, i, v) for (e, s), vs in cells.items() for i, v in enumerate(vs)]
  eff = ce.effects(rows, "binding", 3.0)
  # seed means: random .3 / .5, pretrained .7 / .8
  assert eff["encoder"] == pytest.approx(((0.7 - 0.3) + (0.8 - 0.5)) / 2)
  assert eff["width"] == pytest.approx(((0.5 - 0.3) + (0.8 - 0.7)) / 2)
  text = ce.table(rows, 10)
  assert "binding: encoder effect +0.350, width effect +0.150; the claim holds" in text
  assert "| 3 | all-minilm-l6-v2 | half | 0,1 | 0.700 (0.200)" in text
  # A missing cell: no effect is claimed.
  assert ce.effects(rows[2:], "binding", 3.0) == {"encoder": None, "width": None}
  # The width moving binding more: the claim does not hold.
  cells = {(ce.RANDOM, "half"): 0.1, (ce.RANDOM, "full"): 0.9}
  cells.update({(ce.PRETRAINED, "half"): 0.2, (ce.PRETRAINED, "full"): 0.9})
  rows = [_row(e, s, 0, v) for (e, s), v in cells.items()]
  assert "binding: encoder effect +0.050, width effect +0.750; the claim does not hold" in (
      ce.table(rows, 10)
  )


def _run(tmp_path, *args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "claim_encoder.py"), *args],
      capture_output=True,
      text=True,
      env=env,
      cwd=REPO,
      timeout=600,
  )


def test_bad_flag_values_are_user_errors_naming_them():
  # cli.run prints a UserError as one line (tests/test_cli.py).
  for args, says in (
      (([ce.RANDOM], ["huge"], [0]), "unknown width 'huge'; allowed: ['full', 'half']"),
      (([ce.RANDOM], ["half"], [1, 1]), "--seeds must be distinct"),
      ((["t9"], ["half"], [0]), "--encoders: text.name='t9' is not a known preset"),
  ):
    with pytest.raises(cli.UserError, match=re.escape(says)):
      ce.check_choices(*args)


@pytest.mark.slow
def test_pretrained_encoder_run_end_to_end_and_resume(tmp_path):
  args = [
      f"--outdir={tmp_path}",
      f"--encoders={ce.PRETRAINED}",
      "--widths=half",
      "--seeds=0",
      "--num_steps=2",
      "--num_prompts=8",
      "--sample_steps=2",
      "--override=data.num_train=32",
      "--override=data.num_test=16",
      "--override=train.progress_bar=False",
  ]
  proc = _run(tmp_path, *args)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  (row,) = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
  assert row["run"] == f"{ce.PRETRAINED}_half_seed0" and row["step"] == 2
  assert row["num"] == 8 and 0 < row["num_two_object"] < 8
  for m in ce.METRICS:
    assert 0.0 <= row[m] <= 1.0, (m, row)
  # The run trained the pretrained encoder's cache and the half-width network.
  config = json.loads((tmp_path / "runs" / row["run"] / "config.json").read_text())
  assert config["text"]["name"] == ce.PRETRAINED
  assert list(config["model"]["channels"]) == [64, 96]
  assert (tmp_path / "table.md").exists() and (tmp_path / "binding.png").stat().st_size > 0
  # A rerun scores nothing again and trains nothing.
  again = _run(tmp_path, *args)
  assert again.returncode == 0, again.stderr
  assert "scored already" in again.stdout and "training 2 steps" not in again.stdout
  assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 1
