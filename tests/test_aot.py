"""Ahead-of-time TPU compilation on this CPU machine (libtpu describes the slice).

The script path (`aot/compile_stage.py`) compiles the trainer's own step for a small TPU
topology; the figures come from XLA's per-chip memory and cost analyses.
"""

import json
import os
import subprocess
import sys

import pytest

from imagen_jax.parallel import aot
from imagen_jax.sampling import cascade_report
from tests.test_deepfloyd_cascade import IF_I, IF_II

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  assert r.peak_bytes == r.buffer_bytes == 13 * aot.GIB and r.fits
  assert r.roofline_s == pytest.approx(2.0) and r.xla_flops_bound == pytest.approx(1.0)
  assert r.mfu_bound is None  # no model FLOPs counted
  r.bytes_accessed = 1.2e12 * 4.0  # memory bound: 4 s, compute 2 s
  assert r.roofline_s == pytest.approx(4.0) and r.xla_flops_bound == pytest.approx(0.5)
  # Half of XLA's FLOPs are useful (the rest: remat, the frozen encoder): MFU <= 25%.
  r.model_flops = 275e12 * 1.0
  assert r.mfu_bound == pytest.approx(0.25)
  r.temp_bytes = 40 * aot.GIB
  assert not r.fits
  # XLA's own peak, when given, is what `fits` is judged by.
  r.xla_peak_bytes = 20 * aot.GIB
  assert r.peak_bytes == 20 * aot.GIB and r.fits


@pytest.mark.parametrize("name, gib", [("v4-8", 30.75), ("v5e-4", 15.75), ("v5p-8", 95.74)])
def test_usable_hbm_is_xlas_limit(name, gib):
  """What XLA lets a program use, read from XLA itself: below the nominal HBM on v4 / v5e."""
  device = aot.topology_devices(aot.parse_topology(name))[0]
  assert aot.usable_hbm_bytes(device) == pytest.approx(gib * aot.GIB)


def run_tool(script, *args, timeout=600):
  """`python aot/<script> args` as a user runs it: on the CPU, without the tests' 8 fake
  devices (a slice's devices come from its topology)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "aot", script), *map(str, args)],
      capture_output=True,
      text=True,
      env=env,
      cwd=ROOT,
      timeout=timeout,
  )


def run_script(tmp_path, *args):
  report = tmp_path / "report.json"
  proc = run_tool("compile_stage.py", *args, f"--report_json={report}")
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
  # The attention layers are Pallas' kernel (the text pooling's single query stays dense),
  # checked in the compiled HLO by the script.
  for field in ("attn=dense+flash", "peak_gib=", "usable_gib=0.00", "model_tflop=", "mfu_bound="):
    assert field in summary[0], (field, summary[0])
  for key in ("argument_gib", "output_gib", "alias_gib", "peak_gib", "tflop", "gbytes_accessed"):
    assert data[key] > 0, key
  assert data["temp_gib"] >= 0 and data["xla_peak"] and data["generated_code_mib"] > 0
  assert data["usable_gib"] == pytest.approx(1e-6) and not data["fits"]
  assert data["hbm_gib"] == 16.0  # nominal, for reference
  assert data["buffers_gib"] == pytest.approx(
      data["argument_gib"] + data["output_gib"] - data["alias_gib"] + data["temp_gib"]
  )
  assert data["peak_gib"] >= data["buffers_gib"]
  # Model FLOPs: 3 x the forward per image x 8 images / 4 chips, below XLA's count (which
  # has the encoder, the optimizer and the elementwise work too).
  forward = data["model_forward_gflop_per_image"]
  assert forward["total"] == pytest.approx(
      forward["conv"] + forward["attention"] + forward["dense"]
  )
  assert data["model_tflop"] == pytest.approx(3 * forward["total"] * 8 / 4 / 1e3)
  assert 0 < data["model_tflop"] < data["tflop"]
  assert data["mfu_bound"] == pytest.approx(
      data["model_tflop"] / (data["roofline_s"] * aot.CHIPS["v5e"].peak_tflops)
  )
  # The trainer's step donates its state: the new state is written over the old.
  assert data["alias_gib"] > 0.5 * data["output_gib"]
  # The compiled HLO by kind: every kind of work of this step is found (T5 in the step, the
  # gradient all-reduced over the 4 data-parallel chips).
  parts = data["hlo_breakdown"]
  for kind in ("conv", "attention", "t5", "optimizer", "collectives", "other"):
    assert parts[kind]["count"] > 0 and parts[kind]["gb"] > 0, (kind, parts)
  assert parts["ema"]["count"] >= 0  # XLA may fuse the EMA update into the optimizer's
  assert parts["collective_gb"] > 0


def test_a_cpu_only_attention_path_is_refused_for_a_tpu(tmp_path):
  proc, _, data = run_script(
      tmp_path,
      "--config=configs/base64.py:tiny",
      "--topology=v5e-4",
      "--config.model.attn_impl=per_example",
  )
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert "CPU-only attention path ['per_example']" in proc.stderr and data is None


@pytest.mark.slow
def test_sr_stage_with_cached_embeddings_fits(tmp_path):
  proc, summary, data = run_script(
      tmp_path, "--config=configs/sr256.py:tiny", "--topology=v4-8", "--text=cache"
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "fits=yes" in summary[0] and "chips=4" in summary[0]
  assert data["text"] == "cache" and data["chip"] == "TPU v4" and data["hbm_gib"] == 32.0
  assert data["usable_gib"] == pytest.approx(30.75) and data["attn"] == "dense+flash"
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
  errors = [
      line for line in proc.stderr.splitlines() if line.startswith("compile_stage.py: error: ")
  ]
  assert len(errors) == 1 and message in errors[0], proc.stderr


@pytest.mark.slow
def test_tiny_cascade_compiles_sharded_with_seconds_per_image(tmp_path):
  report = tmp_path / "cascade.json"
  proc = run_tool(
      "compile_cascade.py",
      "--topology=v5e-4",
      "--stages=base64:tiny;sr256:tiny",
      "--cascade=configs/cascade.py:shapes",
      "--batch=8",
      "--cascade.stage2.batch_size=4",  # the SR stage at its own batch
      f"--report_json={report}",
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  data = json.loads(report.read_text())
  assert data["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}  # params stored once, not per chip
  programs = ("encode", "base64_step", "base64_loop", "sr256_step", "sr256_loop")
  for program in programs:
    assert data[program]["peak_gib"] > 0 and data[program]["tflop"] > 0, program
  # `Cascade` keeps T5's and every stage's params resident: the cascade's peak is a program's
  # peak plus the params of the others, against XLA's usable HBM of a v5e.
  resident = data["resident_gib"]
  assert set(resident) == {"encode", "base64", "sr256"} and min(resident.values()) > 0
  expected = max(
      data[p]["peak_gib"] + sum(resident.values()) - resident[p.split("_")[0]] for p in programs
  )
  assert data["peak_gib"] == pytest.approx(expected)
  assert data["peak_gib"] > data["program_peak_gib"]
  assert data["usable_gib"] == pytest.approx(15.75) and data["fits"]
  # Each stage compiled at its own batch; per stage its peak with the others' params resident,
  # what a cascade config naming the report (`aot_report`) is checked against.
  assert data["batch"] == 8 and data["stage_batches"] == {"base64": 8, "sr256": 4}
  stages = data["stages"]
  assert [(f["name"], f["batch"], f["fits"]) for f in stages] == [
      ("base64", 8, True),
      ("sr256", 4, True),
  ]
  assert max(f["peak_gib"] for f in stages) <= data["peak_gib"] + 1e-9  # T5's may be higher
  assert cascade_report.stage_figures({k: v for k, v in data.items() if k != "stages"}) == stages
  with pytest.raises(
      ValueError, match=r"--config.batch_size=8 \(stage 2, sr256\) .* allowed: <= 4"
  ):
    cascade_report.check_batches(
        [str(report)], [("--config.batch_size", 8, "-"), ("--config.batch_size", 8, "-")], 4
    )
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
  assert "compile_cascade: topology=v5e-4 chips=4" in proc.stdout
  # The README's sampling table is made from the same report.
  table = run_tool("scale_table.py", report, timeout=120)
  assert table.returncode == 0, table.stderr
  table = table.stdout.splitlines()
  assert table[0].startswith("| slice (chips) |") and len(table) == 3, table
  assert table[2].startswith(
      "| v5e-4 (4) | 1 x 4 x 1 | 8, sr256 4 | base64 ddim x 25, w=3, sr256 "
  ), table
  assert f"| {data['fid30k_chip_hours']:,.1f} |" in table[2]


def test_scale_table_shows_new_columns_and_na_for_old_reports(tmp_path):
  common = dict(
      stage="base64", chips=256, mesh={"fsdp": 256}, batch=2048, dtype="bfloat16", remat=True
  )
  # A report written before usable HBM, XLA's peak and model FLOPs were recorded: its
  # mfu_bound counted XLA's FLOPs and must not be shown as one.
  old = dict(common, topology="v4-512", text="step", peak_gib=27.6, hbm_gib=32.0, fits=True)
  old.update(tflop=51.5, roofline_s=1.52, mfu_bound=0.12)
  new = dict(common, topology="v5p-512", text="cache", attn="flash", peak_gib=20.0)
  new.update(xla_peak=True, usable_gib=95.74, fits=True, model_tflop=30.0, tflop=40.0)
  new.update(kernel_tflop=1.5, remat_policy="conv_outputs")
  new.update(roofline_s=0.5, mfu_bound=30e12 / (0.5 * 459e12))
  paths = []
  for name, r in (("old", old), ("new", new)):
    paths.append(tmp_path / f"{name}.json")
    paths[-1].write_text(json.dumps(r))
  out = run_tool("scale_table.py", *paths, timeout=120)
  assert out.returncode == 0, out.stderr
  out = out.stdout.splitlines()
  header = [c.strip() for c in out[0].strip("|").split("|")]
  rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in out[2:]]
  by_slice = {r["slice (chips)"]: r for r in rows}
  o, n = by_slice["v4-512 (256)"], by_slice["v5p-512 (256)"]
  assert (o["attn"], o["usable GiB"], o["fits"], o["model TFLOP / step / chip"]) == ("n/a",) * 4
  assert o["MFU bound"] == "n/a" and o["peak GiB / chip"] == "27.6 (buffer sum)"
  assert o["XLA (+ kernel) TFLOP / step / chip"] == "51.5"
  assert (n["attn"], n["peak GiB / chip"], n["usable GiB"], n["fits"]) == (
      "flash",
      "20.0",
      "95.74",
      "yes",
  )
  assert n["model TFLOP / step / chip"] == "30.0" and n["MFU bound"] == "13%"
  # The flash kernel's backward beside XLA's count; what remat keeps, when not the default.
  assert n["XLA (+ kernel) TFLOP / step / chip"] == "40.0 + 1.5"
  assert n["dtype, remat, text"] == "bfloat16, remat (conv_outputs kept), cached T5"
  assert o["dtype, remat, text"] == "bfloat16, remat, T5 in the step"


def test_proxy_needs_block_counts_with_a_common_divisor(tmp_path):
  proc = run_tool(
      "proxy.py",
      "--config=configs/sr256.py:tiny",
      "--topology=v5e-4",
      "--config.model.num_res_blocks=(2,4)",  # gcd 2: only (1, 2) keeps a block per level
      timeout=300,
  )
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert "model.num_res_blocks=(2, 4)" in proc.stderr and "common divisor is 2" in proc.stderr


@pytest.mark.slow
def test_proxy_extrapolates_two_smaller_compiles_to_the_full_block_count(tmp_path):
  """Tiny base with 3 blocks per level: compiled at 1 and 2 blocks, each per-chip figure is
  taken linearly to 3 (docs/results/scale.md compares it with the compile at 3: within 2.4%)."""
  report = tmp_path / "proxy.json"
  proc = run_tool(
      "proxy.py",
      "--config=configs/base64.py:tiny",
      "--topology=v5e-4",
      "--text=cache",
      "--config.model.num_res_blocks=3",
      f"--report_json={report}",
      timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  data = json.loads(report.read_text())
  a, b = data["proxies"]["s_a"], data["proxies"]["s_b"]
  assert data["proxy"] and data["proxy_blocks"] == [[1, 2]]
  for key in ("peak_gib", "tflop", "model_tflop", "gbytes_accessed", "argument_gib"):
    assert data[key] == pytest.approx(2 * b[key] - a[key]), key  # f(3) = f(2) + (f(2) - f(1))
    assert data[key] > b[key] > a[key] > 0, key
  assert "proxy: stage=base64 topology=v5e-4 blocks=1;2->3" in proc.stdout


@pytest.mark.slow
def test_gradient_accumulation_is_reported_and_holds_one_microbatch(tmp_path):
  """The AOT report names the accumulation; 4 microbatches of 16 need fewer temporaries than
  the one batch of 64 (one microbatch's activations live at a time: 0.03 vs 0.09 GiB). Batch
  64, not larger: XLA's TPU compile time of the one-batch program grows with the batch; cached
  text embeddings (no T5 in the step) take a further ~15% off both compiles."""
  temps = {}
  for k in (1, 4):
    (tmp_path / str(k)).mkdir()
    proc, summary, data = run_script(
        tmp_path / str(k),
        "--config=configs/base64.py:tiny",
        "--topology=v5e-4",
        "--text=cache",
        "--config.train.global_batch_size=64",
        f"--config.train.grad_accum_steps={k}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"batch=64 grad_accum_steps={k} " in summary[0], summary
    assert (data["grad_accum_steps"], data["microbatch"]) == (k, 64 // k)
    temps[k] = data["temp_gib"]
  assert temps[4] < temps[1], temps


@pytest.mark.slow
def test_if_cascade_compiles_from_config_json_alone(tmp_path):
  # IF stages from their U-Net folders' config.json (no weights), IF's DDPM loop reading the
  # unconditional text as `Cascade` does; reduced IF configs of the published block types.
  folders = []
  for name, config in (("IF-I", IF_I), ("IF-II", IF_II)):
    folder = tmp_path / name / "unet"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps(dict(config, _class_name="UNet2DConditionModel"))
    )
    folders.append(str(folder))
  report = tmp_path / "if.json"
  proc = run_tool(
      "compile_cascade.py",
      "--topology=v5e-4",
      "--cascade=configs/cascade.py:if_xl",
      f"--cascade.stage1.workdir={folders[0]}",
      f"--cascade.stage2.workdir={folders[1]}",
      "--cascade.stage1.num_steps=4",
      "--cascade.stage2.num_steps=2",
      "--cascade.deepfloyd.text_name=byt5-tiny-random",
      "--cascade.deepfloyd.text_max_length=16",
      "--cascade.deepfloyd.lowres_size=16",
      "--batch=8",
      f"--report_json={report}",
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  data = json.loads(report.read_text())
  for program in ("encode", "if_i_step", "if_i_loop", "if_ii_step", "if_ii_loop"):
    assert data[program]["peak_gib"] > 0 and data[program]["tflop"] > 0, program
  assert set(data["resident_gib"]) == {"encode", "if_i", "if_ii"}
  # IF's DDPM: one guided network call per step (w = 7 and 4, the pipelines' defaults).
  assert data["if_i_settings"] == {"sampler": "ddpm", "num_steps": 4, "network_calls": 4, "w": 7.0}
  assert data["if_ii_settings"]["network_calls"] == 2 and data["if_ii_settings"]["w"] == 4.0
  assert data["s_per_image"] >= data["if_i_s_per_image"] + data["if_ii_s_per_image"] > 0
  # An IF entry without the cascade's deepfloyd block is one clear line.
  bad = run_tool(
      "compile_cascade.py",
      "--topology=v5e-4",
      f"--stages=if:{folders[0]}",
      "--cascade=configs/cascade.py:shapes",
      timeout=300,
  )
  assert bad.returncode == 2 and "deepfloyd block" in bad.stderr, bad.stderr[-2000:]
