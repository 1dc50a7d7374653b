"""Per-stage batch sizes: the cascade config's `stageK.batch_size`, sampled in sub-batches with
the samples of one batch for all stages, refused when they do not divide the devices or when an
AOT cascade report (`aot/compile_cascade.py --report_json`) does not show them fitting."""

import ast
import json
import os

import numpy as np
import pytest

from configs import cascade as cascade_config
from imagen_jax.sampling import cascade, cascade_report, hosts
from tests import cascade_fixtures

# Stochastic samplers (tests/test_cascade.py's: their programs are compiled once per run): each
# sample's initial and per-step noise must follow its index, whatever batch it is drawn in.
SETTINGS = [
    cascade.SamplingSettings(num_steps=3, guidance_weight=3.0, eta=1.0),
    cascade.SamplingSettings(num_steps=2, aug_level=0.2, sampler="ddpm"),
]
PROMPTS = [f"a {c} circle on the {p}" for c in ("red", "blue", "green") for p in ("left", "top")]
# 12 in a batch of 16 (padded): the SR's sub-batches of 8 are a whole one and a padded one,
# and no other shape compiles than those of 16 and the SR's 8 (a compile costs ~10 s here).
PROMPTS = (PROMPTS * 2)[:12]


@pytest.fixture(scope="module")
def model():
  return cascade.Cascade.from_workdirs(cascade_fixtures.shared_tiny_cascade())


def test_per_stage_batches_give_the_samples_of_one_batch(model):
  assert model.batch_multiple == 8  # the 8 fake CPU devices
  one = model.sample(PROMPTS, SETTINGS, seed=2, batch_size=16, progress=False)
  try:
    # SR in sub-batches of 8, re-cut on the host from the base's batches of 16.
    model.set_stage_batch_sizes((None, 8))
    per_stage = model.sample(PROMPTS, SETTINGS, seed=2, batch_size=16, progress=False)
    for a, b in zip(one, per_stage):
      assert a.shape == b.shape
      np.testing.assert_allclose(a, b, atol=2e-5)
    # The SR stage alone on given low-res images, in sub-batches of 8.
    (sr,) = model.sample(
        PROMPTS, SETTINGS[1:], seed=2, batch_size=16, lowres=one[0], progress=False
    )
    np.testing.assert_allclose(sr, one[1], atol=2e-5)
  finally:
    model.set_stage_batch_sizes((None, None))
  assert not np.allclose(one[1][0], one[1][6])  # same prompt, other index: other noise
  with pytest.raises(ValueError, match=r"1 stage batch sizes for a 2-stage cascade"):
    model.set_stage_batch_sizes((8,))
  with pytest.raises(ValueError, match=r"stage 2 batch size 0; allowed: None or an integer >= 1"):
    model.set_stage_batch_sizes((8, 0))


class FakeModel:
  """What `application_batch_size` reads of a `Cascade`: its stages and batch shards."""

  def __init__(self, n_stages=2, batch_multiple=8):
    self.stages = [None] * n_stages
    self.batch_multiple = batch_multiple
    self.stage_batch_sizes = None

  def set_stage_batch_sizes(self, sizes):
    self.stage_batch_sizes = tuple(sizes)


def config(arg="", aot_report=""):
  c = cascade_config.get_config("shapes" + ("," + arg if arg else ""))
  c.aot_report = aot_report  # comma-separated paths: not expressible in the arg string
  return c


def test_stage_batches_come_from_the_config_and_bad_ones_are_refused(model):
  # The real cascade: stage 2 in sub-batches of 16 out of the config's 64.
  assert hosts.application_batch_size(model, None, config("stage2.batch_size=16")) == 64
  assert model.stage_batch_sizes == (None, 16)
  model.set_stage_batch_sizes((None, None))
  m = FakeModel()
  assert hosts.application_batch_size(m, 32, config("stage1.batch_size=8")) == 32  # the flag's
  assert m.stage_batch_sizes == (8, None)
  allowed = r"allowed: 0 \(the cascade's batch\) or one of \[8, 16, 32, 64\]"
  for bad in ("12", "-8", "128", "4"):  # not dividing 64, negative, above it, below the shards
    with pytest.raises(ValueError, match=rf"--config.stage2.batch_size={bad} .*{allowed}"):
      hosts.application_batch_size(FakeModel(), None, config(f"stage2.batch_size={bad}"))
  with pytest.raises(
      ValueError, match=r"--config.stage1.batch_size=32 .* --batch_size=16 .*\[8, 16\]"
  ):
    hosts.application_batch_size(FakeModel(), 16, config("stage1.batch_size=32"))
  with pytest.raises(ValueError, match=r"--config.batch_size=60 does not divide over the 8"):
    hosts.application_batch_size(FakeModel(), None, config("batch_size=60"))


def aot_report(topology="v5e-8", chips=8, batch=32, stage_batches=None, sr_loop_peak=9.0):
  """A report as aot/compile_cascade.py writes one (its fields, figures made up): T5 and two
  stages, each stage's step and loop with its peak per chip and the params resident."""
  stage_batches = stage_batches or {"base64": batch, "sr256": batch}

  def program(peak):
    return dict(peak_gib=peak, usable_gib=15.75, hbm_gib=16.0, fits=peak <= 15.75, tflop=1.0)

  r = dict(topology=topology, chips=chips, batch=batch, stage_batches=stage_batches)
  r.update(encode=program(3.0), base64_step=program(3.0), base64_loop=program(4.5))
  r.update(sr256_step=program(8.0), sr256_loop=program(sr_loop_peak))
  r.update(resident_gib={"encode": 2.0, "base64": 1.5, "sr256": 0.5}, usable_gib=15.75)
  return r


def write(tmp_path, name, report):
  path = tmp_path / name
  path.write_text(json.dumps(report))
  return str(path)


def test_stage_figures_add_the_other_programs_params():
  # sr256's loop alone (12.5 GiB) fits 15.75 GiB; with T5's and the base's params resident
  # (2.0 + 1.5 GiB) it needs 16.0: the cascade's peak does not fit.
  figures = cascade_report.stage_figures(aot_report(sr_loop_peak=12.5))
  assert [f["name"] for f in figures] == ["base64", "sr256"]
  assert figures[0]["fits"] and figures[0]["peak_gib"] == pytest.approx(4.5 + 2.5)
  assert not figures[1]["fits"] and figures[1]["peak_gib"] == pytest.approx(16.0)
  assert "peak 16.00 GiB per chip (12.50 GiB + 3.50 GiB" in figures[1]["figure"]
  # A report with its own `stages` (aot/compile_cascade.py writes this function's result) reads as is.
  report = aot_report(sr_loop_peak=12.5)
  assert cascade_report.stage_figures(dict(report, stages=figures)) == figures


def test_a_batch_the_aot_report_does_not_show_fitting_is_refused(tmp_path):
  big = write(tmp_path, "b32.json", aot_report(batch=32, sr_loop_peak=12.5))  # sr256 does not fit
  small = write(
      tmp_path, "b16.json", aot_report(batch=32, stage_batches={"base64": 32, "sr256": 16})
  )
  # Only the batch-32 report: no batch is shown fitting sr256.
  with pytest.raises(ValueError) as e:
    hosts.application_batch_size(FakeModel(), None, config("batch_size=32", big))
  msg = str(e.value)
  assert "--config.batch_size=32 (stage 2, sr256): no AOT report shows a batch that fits" in msg
  assert f"{big} compiles sr256 at batch 32, peak 16.00 GiB per chip" in msg and "\n" not in msg
  # Both: refused with the batch that fits, and the setting to change.
  both = f"{big},{small}"
  with pytest.raises(
      ValueError,
      match=r"--config.batch_size=32 \(stage 2, sr256\) is above what the AOT report shows "
      r"fitting: .*b16.json compiles sr256 at batch 16, peak 12.50 GiB .*<= 15.75 GiB usable; "
      r"allowed: <= 16 \(set --config.stage2.batch_size=16\)",
  ):
    hosts.application_batch_size(FakeModel(), None, config("batch_size=32", both))
  with pytest.raises(ValueError, match=r"--config.stage2.batch_size=32 .* allowed: <= 16$"):
    hosts.application_batch_size(
        FakeModel(), None, config("batch_size=32,stage2.batch_size=32", both)
    )
  m = FakeModel()
  assert hosts.application_batch_size(m, None, config("batch_size=32,stage2.batch_size=8", both))
  assert m.stage_batch_sizes == (None, 8)  # 8 <= 16, shown fitting
  # A report of another slice, and a missing one.
  other = write(tmp_path, "v4.json", aot_report(topology="v4-8", chips=4))
  with pytest.raises(ValueError, match=r"is for v4-8 \(4 chips\) but this job has 8 devices"):
    hosts.application_batch_size(FakeModel(), None, config("", other))
  with pytest.raises(ValueError, match=r"aot_report '/nonexistent.json' does not exist"):
    hosts.application_batch_size(FakeModel(), None, config("", "/nonexistent.json"))


def test_sample_cli_refuses_a_batch_the_report_does_not_show_fitting(tmp_path):
  report = aot_report(batch=16, stage_batches={"base64": 16, "sr256": 8}, sr_loop_peak=9.0)
  path = write(tmp_path, "tiny.json", report)
  proc = cascade_fixtures.run_sample_cli(
      "--prompt=a", f"--outdir={tmp_path}/out", f"--config.aot_report={path}", batch_size=16
  )
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert "--config.batch_size=16 (stage 2, sr256) is above" in lines[0]
  assert "allowed: <= 8 (set --config.stage2.batch_size=8)" in lines[0]
  assert not os.path.exists(tmp_path / "out")


EXPERIMENTS = ("coco_fid30k.py", "coco_guidance_sweep.py", "guidance_sweep.py", "drawbench.py")


@pytest.mark.parametrize("script", EXPERIMENTS)
def test_experiments_take_their_batches_from_the_cascade_config(script):
  # Their --batch_size defaults to None (= the config's) and goes through the one check.
  tree = ast.parse(open(os.path.join(cascade_fixtures.REPO, "experiments", script)).read())
  calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
  flag = [
      c
      for c in calls
      if ast.unparse(c.func) == "flags.DEFINE_integer"
      and ast.literal_eval(c.args[0]) == "batch_size"
  ]
  assert len(flag) == 1 and ast.literal_eval(flag[0].args[1]) is None
  assert any(ast.unparse(c.func) == "hosts.application_batch_size" for c in calls)
  assert not any(ast.unparse(c.func).endswith("check_batch_size") for c in calls)
