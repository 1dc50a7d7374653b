"""Negative prompts in the sample CLI: `--negative_prompt` reaches the unconditional half of
guidance of our own stages (the shared tiny cascade; the IF stages' case is in
tests/test_deepfloyd_cascade.py)."""

import json

import numpy as np
import PIL.Image
import pytest

from tests import cascade_fixtures


@pytest.mark.slow
def test_sample_cli_negative_prompt(tmp_path):
  outs = {}
  for name, flags in (("plain", ()), ("neg", ("--negative_prompt=a blue square",))):
    out = tmp_path / name
    proc = cascade_fixtures.run_sample_cli(
        "--prompt=a red circle",
        "--num_per_prompt=1",
        "--config.num_stages=1",
        f"--outdir={out}",
        *flags,
        batch_size=8,  # one prompt pads a batch over the 8 fake devices
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with PIL.Image.open(out / "stage1" / "0000.png") as im:
      outs[name] = np.asarray(im).astype(int)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["negative_prompt"] == (None if name == "plain" else "a blue square")
  # Stage 1 guides with w = 3: the negative prompt replaces the null text, so the image moves.
  assert np.abs(outs["neg"] - outs["plain"]).max() > 0
