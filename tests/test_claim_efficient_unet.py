"""Claim 4 (Efficient U-Net vs the plain U-Net, Imagen §2.5 / App. B.1): the plain U-Net preset and
its config path, the loss-curve arithmetic of experiments/claim_efficient_unet.py, its bad flags,
and a tiny end-to-end run (benchmark + both trainings) that a rerun does not train again."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import base64
from experiments import claim_efficient_unet as claim
from imagen_jax.stage import Stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(config) -> int:
  return sum(x.size for x in jax.tree.leaves(Stage.from_config(config).abstract_params()))


def test_shapes_unet_is_the_plain_block_at_the_efficient_unets_size():
  eff = base64.get_config("shapes")
  plain = base64.get_config("shapes,model=shapes_unet")
  assert eff.model.kind == "efficient_unet" and plain.model.kind == "unet"
  # The rest of the stage (data, text, training) is the demo's, so the runs compare networks.
  for section in ("data", "text", "optim", "train", "diffusion"):
    assert plain[section].to_dict() == eff[section].to_dict(), section
  ratio = _params(plain) / _params(eff)
  assert 0.85 <= ratio <= 1.15, ratio  # "a similar parameter count"
  # Attention where the Efficient U-Net attends (its two blocks at 8x8 and 4x4 of 32x32), with
  # the same conditioning widths and heads.
  assert tuple(plain.model.attn_resolutions) == (8, 4) and plain.model.text_cross_attention
  assert tuple(eff.model.text_cross_attention) == (True, True)
  for field in ("embed_dim", "text_proj_dim", "num_heads", "pool_heads", "text_positions"):
    assert plain.model[field] == eff.model[field], field


def test_plain_unet_takes_config_model_flags(monkeypatch):
  argv = [
      "prog",
      f"--config={REPO}/configs/base64.py:shapes,model=shapes_unet",
      "--config.model.base_channels=48",
      "--config.model.channel_mult=(1,2,3)",
  ]
  monkeypatch.setattr("sys.argv", argv)  # config_flags reads the overrides from sys.argv
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  fv(argv)
  c = fv.config
  assert c.model.kind == "unet" and c.model.base_channels == 48
  assert tuple(c.model.channel_mult) == (1, 2, 3)
  with pytest.raises(ValueError, match="unknown size 'huge' for stage 'base64'.*shapes_unet"):
    base64.get_config("shapes,model=huge")


def _write_metrics(workdir, rows):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def test_curve_wall_time_smoothing_and_table(tmp_path):
  # Rows every 10 steps: the first at 1 step/s (compile), then 10 steps/s.
  rows = [dict(step=10, loss=1.0, steps_per_sec=1.0, lr=1e-3)]
  rows += [dict(step=10 * i, loss=1.0 / i, steps_per_sec=10.0) for i in range(2, 7)]
  _write_metrics(tmp_path / "a", rows)
  curve = claim.read_curve(str(tmp_path / "a"))
  np.testing.assert_allclose(curve["wall_s"], [10, 11, 12, 13, 14, 15])
  np.testing.assert_array_equal(curve["step"], [10, 20, 30, 40, 50, 60])
  # The mean of the rows in (t - window, t]; at least the last row before t; NaN before any.
  assert claim.smoothed_loss(curve, 15.0, 2.5) == pytest.approx((1 / 4 + 1 / 5 + 1 / 6) / 3)
  assert claim.smoothed_loss(curve, 12.5, 0.1) == pytest.approx(1 / 3)
  assert np.isnan(claim.smoothed_loss(curve, 9.0, 5.0))
  assert len(claim.read_curve(str(tmp_path / "missing"))["wall_s"]) == 0
  # A slower network: 2 steps/s after its compile; equal time = the shorter loop (15 s).
  _write_metrics(
      tmp_path / "b", [dict(step=5 * i, loss=2.0 / i, steps_per_sec=2.0) for i in range(1, 11)]
  )
  curves = {"efficient_unet": curve, "unet": claim.read_curve(str(tmp_path / "b"))}
  done = {n: dict(step=int(c["step"][-1]), budget_s=60.0) for n, c in curves.items()}
  bench = {"efficient_unet": dict(params=8_050_000, temp_bytes=2**20, steps_per_s=9.0)}
  args = {"efficient_unet": "shapes", "unet": "shapes,model=shapes_unet"}
  out = claim.result_rows(curves, done, bench, args, 2.5)
  assert [r["network"] for r in out] == ["efficient_unet", "unet"]
  assert out[0]["equal_time_s"] == out[1]["equal_time_s"] == 15.0
  # Its rows at 2.5 s steps: the window (12.5, 15] holds one, (20, 25] two.
  assert out[1]["loss_at_equal_time"] == pytest.approx(2 / 6)
  out = claim.result_rows(curves, done, bench, args, 5.0)
  assert out[1]["final_loss"] == pytest.approx((2 / 9 + 2 / 10) / 2)
  assert out[0]["train_steps_per_s"] == 10.0  # the compile row left out
  table = claim.table(out)
  assert "| efficient_unet | 8.05M | - | 9.00 / 10.00 | 1 |" in table
  assert "loss at 15 s" in table and "`configs/base64.py:shapes,model=shapes_unet`" in table
  # A run whose first row (its compile) comes after the equal time has no loss there.
  _write_metrics(tmp_path / "c", [dict(step=10, loss=0.5, steps_per_sec=0.5)])
  late = dict(curves, unet=claim.read_curve(str(tmp_path / "c")))
  late_rows = claim.result_rows(late, done, bench, args, 2.5)
  assert late_rows[1]["loss_at_equal_time"] is None and late_rows[1]["final_loss"] == 0.5
  assert claim.table(late_rows).splitlines()[5].endswith("| 0.5000 | - | - / - / - |")
  claim.plot(curves, out, str(tmp_path / "plot.png"), 2.5)
  assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run(*args, timeout=900):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "claim_efficient_unet.py"), *args],
      cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      timeout=timeout,
  )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--budget_s=0"], "--budget_s=0.0: allowed: a number of seconds > 0"),
        (["--unet=shapes"], "--unet=shapes builds a efficient_unet; the unet run needs kind unet"),
        (["--networks=unet,unet"], "--networks=unet,unet: allowed: two or three different of"),
        (["--eval_prompts=-1"], "--eval_prompts=-1: allowed: >= 0"),
        (["--unet=shapes,model=huge"], "--unet: unknown size 'huge'"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, args, expected):
  proc = _run(f"--outdir={tmp_path}", *args, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert not os.listdir(tmp_path)  # nothing built or written


# Both networks cut to one level with one block, and a few steps: the plumbing is the claim
# here (the figures are the full run's), and each step compiles in a fraction of the time.
ONE_LEVEL = "model.num_res_blocks=(1,),model.strides=(2,),model.self_attention=(True,)"
TINY = [
    "--common=batch=8,data.num_train=64,data.num_test=16,log_every=2,ckpt_every=4",
    f"--efficient=shapes,model.channels=(32,),{ONE_LEVEL},model.text_cross_attention=(True,)",
    "--unet=shapes,model=shapes_unet,model.channel_mult=(1,),model.attn_resolutions=(16,)",
    "--networks=efficient_unet,unet",
    "--max_steps=6",
    "--bench_steps=1",
    "--budget_s=600",
    "--window_s=30",
    "--eval_prompts=8",
    "--eval_sample_steps=2",
]


@pytest.mark.slow
def test_tiny_run_writes_the_table_and_a_rerun_trains_nothing(tmp_path):
  out = tmp_path / "out"
  proc = _run(f"--outdir={out}", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(out / "rows.jsonl")]
  assert [r["network"] for r in rows] == ["efficient_unet", "unet"]
  for r in rows:
    assert r["steps"] == 6 and r["params"] > 0 and r["temp_mib"] > 0
    assert r["bench_steps_per_s"] > 0 and r["train_steps_per_s"] > 0
    assert np.isfinite(r["final_loss"])
    assert 0 <= r["shapes_color"] <= 1 and r["eval_n"] == 8  # the shapes metric of samples
  assert rows[0]["model_gflop_per_step"] < rows[1]["model_gflop_per_step"]
  assert "| efficient_unet |" in (out / "table.md").read_text()
  assert (out / "unet" / "eval" / "samples.png").exists()
  assert (out / "loss_vs_time.png").stat().st_size > 0
  for name in ("efficient_unet", "unet"):
    assert json.loads((out / name / "bench.json").read_text())[0]["batch"] == 8
    done = json.loads((out / name / "done.json").read_text())
    assert done["reached_num_steps"] and done["step"] == 6
  # The rerun resumes: no benchmark, no training, no scoring, the same rows.
  metrics = (out / "unet" / "train" / "metrics.jsonl").read_text()
  proc = _run(f"--outdir={out}", *TINY, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("not trained again") == 2, proc.stdout
  assert "== training" not in proc.stdout and "== benchmark" not in proc.stdout
  assert "== scoring" not in proc.stdout
  assert (out / "unet" / "train" / "metrics.jsonl").read_text() == metrics
  assert [json.loads(line) for line in open(out / "rows.jsonl")] == rows
