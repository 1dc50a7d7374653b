"""benchmarks/gpu_mfu.sh, the prepared GPU MFU check, run on this CPU at tiny size."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_mfu_script_reports_model_flops_mfu_on_cpu():
  env = dict(
      os.environ,
      PYTHONPATH=ROOT,
      JAX_PLATFORMS="cpu",
      PY=sys.executable,
      PRESETS="base64:tiny",
      BATCHES="2",
      STEPS="1",
      PEAK_TFLOPS="0.5",  # a CPU has no published peak: the MFU figure needs one
  )
  env.pop("XLA_FLAGS", None)  # one device, as on the GPU machine
  proc = subprocess.run(
      ["bash", os.path.join(ROOT, "benchmarks", "gpu_mfu.sh")],
      capture_output=True,
      text=True,
      env=env,
      cwd=ROOT,
      timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("gpu_mfu: ")]
  assert len(lines) == 1, proc.stdout[-3000:]
  fields = dict(re.findall(r"(\w+)=(\S+)", lines[0]))
  assert fields["preset"] == "base64:tiny" and fields["batch"] == "2"
  # Tiny layers on CPU: dense attention (the text pooling too).
  assert fields["attn"] == "dense", lines[0]
  step, model, xla = (float(fields[k]) for k in ("step_s", "model_tflop", "xla_tflop"))
  # Both count the same convs and matmuls, up to what each leaves out (XLA: the taps on
  # the zero padding, large at the tiny preset's 4x4 maps; the model count: the optimizer
  # and the elementwise work).
  assert 0 < model and 0.5 < xla / model < 1.5, lines[0]
  mfu = float(fields["mfu"].rstrip("%")) / 100
  assert mfu == pytest.approx(model * 1e12 / (step * 0.5e12), rel=0.05)
