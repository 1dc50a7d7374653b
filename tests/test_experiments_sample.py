"""The sampling CLI (`python -m imagen_jax.sampling`) on tiny random stages, and the trainer
runner the applications use (`imagen_jax.cli_runner`)."""

import json
import os
import sys

import numpy as np
import PIL.Image
import pytest

from imagen_jax import cli_runner
from tests import cascade_fixtures


def test_sample_cli_writes_grids_singles_sheet_and_settings(tmp_path):
  prompt_file = tmp_path / "prompts.txt"
  prompt_file.write_text("# comment\nColors\ta blue square\n")
  out = tmp_path / "out"
  proc = cascade_fixtures.run_sample_cli(
      "--prompt=a red circle",
      f"--prompt_file={prompt_file}",
      "--num_per_prompt=2",
      f"--outdir={out}",
      batch_size=8,  # the 8 fake devices: 4 samples pad one batch
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  settings = json.loads((out / "settings.json").read_text())
  assert settings["prompts"] == ["a red circle", "a blue square"]  # category column dropped
  assert settings["num_per_prompt"] == 2 and len(settings["stage_steps"]) == 2
  with PIL.Image.open(out / "stage1_grid.png") as g:  # 2 x 2 grid of 16px with 1px gaps
    assert g.size == (2 * 17 - 1, 2 * 17 - 1)
  singles = sorted(os.listdir(out / "stage2"))
  assert singles == ["0000.png", "0001.png", "0002.png", "0003.png"]
  with PIL.Image.open(out / "stage2" / "0000.png") as im:
    assert np.asarray(im).shape == (32, 32, 3)
  with PIL.Image.open(out / "samples.png") as sheet:  # prompt label + one column per stage
    assert sheet.size == (260 + 2 * (128 + 4) + 4, 18 + 2 * (128 + 4) + 4)
  assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_runner_stops_at_the_deadline_and_reports_failures(tmp_path):
  # A stand-in for the trainer: exits cleanly on SIGTERM, as the trainer's preemption path does.
  sleeper = [
      sys.executable,
      "-c",
      "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
      "time.sleep(60)",
  ]
  assert cli_runner.run_until(sleeper, deadline_s=0.5) is False
  assert cli_runner.run_until([sys.executable, "-c", "pass"], deadline_s=30) is True
  with pytest.raises(cli_runner.TrainingFailed, match="code 3"):
    cli_runner.run_until([sys.executable, "-c", "raise SystemExit(3)"])
