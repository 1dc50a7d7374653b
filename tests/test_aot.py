"""Ahead-of-time TPU compilation on this CPU machine (libtpu describes the slice).

The script path (`launch/aot_compile.py`) compiles the trainer's own step for a small TPU
topology; the figures come from XLA's per-chip memory and cost analyses.
"""

import json
import os
import subprocess
import sys

import pytest

from imagen_jax.parallel import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "aot_compile.py")


@pytest.mark.parametrize(
    "name, generation, chips, grid",
    [
        ("v4-8", "v4", 4, (2, 2, 1)),
        ("v4-512", "v4", 256, (4, 8, 8)),
        ("v5p-128", "v5p", 64, (4, 4, 4)),
        ("v5e-256", "v5e", 256, (16, 16)),
        ("v5litepod-8", "v5e", 8, (2, 4)),
        ("v4:4x4x8", "v4", 128, (4, 4, 8)),
    ],
)
def test_topology_names(name, generation, chips, grid):
  t = aot.parse_topology(name)
  assert (t.generation, t.num_chips, t.grid) == (generation, chips, grid)
  assert t.libtpu_name == f"{generation}:{'x'.join(map(str, grid))}"


@pytest.mark.parametrize("name", ["v3-8", "v4-12", "v4-2", "v5e:4x4x4", "tpu", "v4-"])
def test_bad_topology_names_are_one_clear_error(name):
  with pytest.raises(ValueError, match="topology") as e:
    aot.parse_topology(name)
  assert name in str(e.value)


def test_roofline_is_the_slower_of_compute_and_memory():
  chip = aot.CHIPS["v4"]
  r = aot.Report(
      argument_bytes=3 * aot.GIB,
      output_bytes=2 * aot.GIB,
      alias_bytes=2 * aot.GIB,
      temp_bytes=10 * aot.GIB,
      flops=275e12 * 2.0,  # 2 s of compute at v4's peak
      bytes_accessed=1.2e12 * 0.5,  # 0.5 s of HBM traffic
      chip=chip,
      hbm_bytes=chip.hbm_gib * aot.GIB,
  )
  assert r.peak_bytes == 13 * aot.GIB and r.fits
  assert r.roofline_s == pytest.approx(2.0) and r.mfu_bound == pytest.approx(1.0)
  r.bytes_accessed = 1.2e12 * 4.0  # memory bound: 4 s, compute 2 s
  assert r.roofline_s == pytest.approx(4.0) and r.mfu_bound == pytest.approx(0.5)
  r.temp_bytes = 40 * aot.GIB
  assert not r.fits


def run_script(tmp_path, *args):
  report = tmp_path / "report.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)  # the tests' 8 fake CPU devices are not the slice's
  proc = subprocess.run(
      [sys.executable, SCRIPT, *args, f"--report_json={report}"],
      capture_output=True,
      text=True,
      env=env,
      cwd=ROOT,
      timeout=600,
  )
  summary = [line for line in proc.stdout.splitlines() if line.startswith("aot: ")]
  data = json.loads(report.read_text()) if report.exists() else None
  return proc, summary, data


@pytest.mark.slow
def test_tiny_stage_compiles_and_a_tiny_budget_does_not_fit(tmp_path):
  proc, summary, data = run_script(
      tmp_path, "--config=configs/base64.py:tiny", "--topology=v5e-4", "--hbm_gib=1e-6"
  )
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert len(summary) == 1 and "stage=base64 topology=v5e-4 chips=4" in summary[0]
  assert "fits=no" in summary[0] and "GiB over" in summary[0]
  for key in ("argument_gib", "output_gib", "alias_gib", "peak_gib", "tflop", "gbytes_accessed"):
    assert data[key] > 0, key
  assert data["temp_gib"] >= 0
  assert data["hbm_gib"] == pytest.approx(1e-6) and not data["fits"]
  assert data["peak_gib"] == pytest.approx(
      data["argument_gib"] + data["output_gib"] - data["alias_gib"] + data["temp_gib"]
  )
  # The trainer's step donates its state: the new state is written over the old.
  assert data["alias_gib"] > 0.5 * data["output_gib"]


@pytest.mark.slow
def test_sr_stage_with_cached_embeddings_fits(tmp_path):
  proc, summary, data = run_script(
      tmp_path, "--config=configs/sr256.py:tiny", "--topology=v4-8", "--text=cache"
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "fits=yes" in summary[0] and "chips=4" in summary[0]
  assert data["text"] == "cache" and data["chip"] == "TPU v4" and data["hbm_gib"] == 32.0
  assert data["roofline_s"] > 0 and 0 < data["mfu_bound"] <= 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--topology=v9-8"], "unknown TPU topology 'v9-8'"),
        (["--topology=v5e-8", "--config.mesh.shape.fsdp=3"], "8 chips"),
        (["--topology=v5e-8", "--config.train.global_batch_size=6"], "global_batch_size=6"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, message):
  proc, _, _ = run_script(tmp_path, "--config=configs/base64.py:tiny", *args)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("aot_compile.py: error: ")]
  assert len(errors) == 1 and message in errors[0], proc.stderr


@pytest.mark.slow
def test_tiny_cascade_compiles_sharded_with_seconds_per_image(tmp_path):
  report = tmp_path / "cascade.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [
          sys.executable,
          os.path.join(ROOT, "launch", "aot_cascade.py"),
          "--topology=v5e-4",
          "--stages=base64:tiny;sr256:tiny",
          "--cascade=configs/cascade.py:shapes",
          "--batch=8",
          f"--report_json={report}",
      ],
      capture_output=True,
      text=True,
      env=env,
      cwd=ROOT,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  data = json.loads(report.read_text())
  assert data["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}  # params stored once, not per chip
  for program in ("encode", "base64_step", "base64_loop", "sr256_step", "sr256_loop"):
    assert data[program]["peak_gib"] > 0 and data[program]["tflop"] > 0, program
  # The guided base step runs the network on the conditional and the null batch.
  assert data["base64_settings"] == {
      "sampler": "ddim",
      "num_steps": 25,
      "network_calls": 25,
      "w": 3.0,
  }
  per_image = data["base64_s_per_image"] + data["sr256_s_per_image"]
  assert data["s_per_image"] >= per_image > 0
  assert data["fid30k_chip_hours"] == pytest.approx(30_000 * data["s_per_image"] * 4 / 3600)
  assert "aot_cascade: topology=v5e-4 chips=4" in proc.stdout
  # The README's sampling table is made from the same report.
  table = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "scale_table.py"), str(report)],
      capture_output=True,
      text=True,
      env=env,
      cwd=ROOT,
      timeout=120,
      check=True,
  ).stdout.splitlines()
  assert table[0].startswith("| slice (chips) |") and len(table) == 3, table
  assert table[2].startswith("| v5e-4 (4) | 1 x 4 x 1 | 8 | base64 ddim x 25, w=3, sr256 "), table
  assert f"| {data['fid30k_chip_hours']:,.1f} |" in table[2]


@pytest.mark.slow
def test_gradient_accumulation_is_reported_and_holds_one_microbatch(tmp_path):
  """The AOT report names the accumulation; 4 microbatches of 8 need fewer temporaries than
  the one batch of 32 (one microbatch's activations live at a time)."""
  temps = {}
  for k in (1, 4):
    (tmp_path / str(k)).mkdir()
    proc, summary, data = run_script(
        tmp_path / str(k),
        "--config=configs/base64.py:tiny",
        "--topology=v5e-4",
        "--config.train.global_batch_size=32",
        f"--config.train.grad_accum_steps={k}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"batch=32 grad_accum_steps={k} " in summary[0], summary
    assert (data["grad_accum_steps"], data["microbatch"]) == (k, 32 // k)
    temps[k] = data["temp_gib"]
  assert temps[4] < temps[1], temps
