"""Multi-host sampling and evaluation: 2 processes x 4 fake devices on 127.0.0.1 give the numbers
of 1 process x 8 devices (cascade samples, a guidance sweep's FD / CLIP / shapes rows, COCO
FID), with each process sampling only its block of the prompts. Tiny random stages, a random
FID InceptionV3 and the tiny CLIP checkpoint: the numbers are meaningless, the plumbing real.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from imagen_jax.evals import convert_weights
from imagen_jax.sampling import hosts
from tests import cascade_fixtures

ROOT = cascade_fixtures.REPO
CLIP_CKPT = os.path.join(ROOT, "tests", "goldens", "clip", "tiny_clip")

RUNNER = r"""
import json, os, sys
outdir, root, dist = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
# COCO FID through the script as users run it; its --distributed flags start the job.
import runpy
argv = [
    "experiments/coco_fid30k.py", f"--workdirs={root}/base,{root}/sr", "--config=configs/cascade.py:shapes",
    "--config.stage1.num_steps=2", "--config.stage2.num_steps=2", f"--coco_dir={root}/coco",
    f"--inception={root}/inception.safetensors", "--protocol=paper", "--num_samples=5",
    "--batch_size=8", "--chunk=3", f"--outdir={outdir}/coco"]
if dist:
  argv += ["--distributed", f"--coordinator_address={dist['address']}", "--num_processes=2",
           f"--process_id={dist['id']}"]
sys.argv = argv
try:  # the script as `python experiments/coco_fid30k.py ...` runs it; it exits at the end
  runpy.run_path("experiments/coco_fid30k.py", run_name="__main__")
except SystemExit as e:
  assert not e.code, e.code

import jax, numpy as np
from imagen_jax.sampling import cascade
from imagen_jax.evals import clip, features, prompts, sweep
from imagen_jax.sampling import hosts

model = cascade.Cascade.from_workdirs([os.path.join(root, "base"), os.path.join(root, "sr")])
calls = []  # prompts this process sampled itself
real_sample = model.sample
model.sample = lambda p, *a, **k: calls.append(len(p)) or real_sample(p, *a, **k)
S = cascade.SamplingSettings
settings = [S(num_steps=2, guidance_weight=3.0), S(num_steps=2, aug_level=0.1)]
texts = ["a red circle", "a blue square", "a green triangle", "a red square", "a blue circle"]
s1, s2 = hosts.sample(model, texts, settings, seed=3, batch_size=8, progress=False)

d = model.stages[1].config.data
ps, attrs, ref = prompts.shapes_test_prompts(
    os.path.join(root, "shapes"), 32, num_train=int(d.num_train), num_test=int(d.num_test),
    seed=int(d.shapes_seed), limit=6)
r = sweep.run_sweep(
    model, ps, settings, sweep.make_points([1.5, 3.0], ["dynamic"]), os.path.join(outdir, "sweep"),
    sweep_stage=0, attributes=attrs, reference_images=ref,
    features=features.RandomConvFeatures(batch_size=8),
    clip_scorer=clip.CLIPScorer(os.path.join(root, "tiny_clip"), batch_size=8, progress=False),
    seed=0, batch_size=8, progress=False)

with open(os.path.join(outdir, f"calls_{jax.process_index()}.json"), "w") as f:
  json.dump(calls, f)
if hosts.is_writer():
  rows = [{k: row[k] for k in ("fd", "clip_score", "alignment_color_shape", "saturation_final")}
          for row in r.rows]
  np.savez(os.path.join(outdir, "results.npz"), s1=s1, s2=s2, rows=json.dumps(rows))
"""


def _fake_coco(root, n=4):
  rng = np.random.default_rng(0)
  (root / "val2014").mkdir(parents=True)
  (root / "annotations").mkdir()
  imgs, anns = [], []
  for i in range(n):
    name = f"COCO_val2014_{i:012d}.jpg"
    PIL.Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(
        root / "val2014" / name
    )
    imgs.append({"id": i, "file_name": name})
    anns += [{"id": 10 * i + j, "image_id": i, "caption": f"shape {i} colour {j}"} for j in (0, 1)]
  (root / "annotations" / "captions_val2014.json").write_text(
      json.dumps({"images": imgs, "annotations": anns})
  )


def _env(devices):
  """A child's environment: `devices` fake CPU devices; the test run's compilation cache
  (tests/conftest.py) is inherited, so the multi-host tests share the tiny cascade's programs."""
  return dict(
      os.environ,
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      JAX_PLATFORMS="cpu",
      PYTHONPATH=ROOT,
  )


def test_multihost_block_bounds_cover_rows_once_in_order():
  for n, block, count in [(5, 3, 2), (8, 4, 2), (1, 1, 3), (7, 2, 4)]:
    spans = [hosts.block_bounds(n, block, p) for p in range(count)]
    assert [i for a, b in spans for i in range(a, b)] == list(range(n))
  with pytest.raises(ValueError, match="block must be >= 1, got 0"):
    hosts.block_bounds(4, 0)


@pytest.mark.slow
@pytest.mark.multihost
def test_multihost_sampling_sweep_and_fid_match_one_process(tmp_path):
  root = tmp_path / "inputs"
  cascade_fixtures.write_tiny_cascade(str(root))
  _fake_coco(root / "coco")
  os.symlink(CLIP_CKPT, root / "tiny_clip")
  convert_weights.save_flax_weights(
      convert_weights.convert_state_dict(convert_weights.random_torch_state_dict(0)),
      str(root / "inception.safetensors"),
  )
  # The shapes test split is built once here; the runs only read it.
  from imagen_jax.evals import prompts

  prompts.shapes_test_prompts(str(root / "shapes"), 32, num_train=64, num_test=16, seed=0, limit=6)
  script = tmp_path / "runner.py"
  script.write_text(RUNNER)

  def start(outdir, dist, devices):
    return subprocess.Popen(
        [sys.executable, str(script), str(outdir), str(root), json.dumps(dist)],
        env=_env(devices),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [start(tmp_path / "single", {}, 8)] + [
      start(
          tmp_path / "multi",
          {"address": f"127.0.0.1:{port}", "id": i},
          4,
      )
      for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-4000:]

  one, two = (np.load(tmp_path / d / "results.npz") for d in ("single", "multi"))
  # Each process sampled only its block (5 cascade prompts, 6 sweep prompts padded to 8), in
  # local batches of 8 / 2 = 4.
  calls = [json.loads((tmp_path / "multi" / f"calls_{i}.json").read_text()) for i in (0, 1)]
  assert calls == [[4, 4, 4], [4, 4, 4]]
  assert json.loads((tmp_path / "single" / "calls_0.json").read_text()) == [8, 8, 8]
  # Per-sample noise: sample i is the same whichever process draws it.
  assert one["s1"].shape == (5, 16, 16, 3) and one["s2"].shape == (5, 32, 32, 3)
  np.testing.assert_allclose(two["s1"], one["s1"], atol=1e-5)
  np.testing.assert_allclose(two["s2"], one["s2"], atol=1e-5)
  assert np.abs(one["s2"][0] - one["s2"][1]).max() > 0.1  # the samples are not all alike
  # The sweep's rows: random-conv FD, CLIP score, shapes alignment, saturation.
  rows1, rows2 = json.loads(str(one["rows"])), json.loads(str(two["rows"]))
  assert len(rows1) == len(rows2) == 2
  for a, b in zip(rows1, rows2):
    for k in a:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
  points = sorted(os.listdir(tmp_path / "multi" / "sweep" / "points"))
  assert len(points) == 2 and points == sorted(os.listdir(tmp_path / "single" / "sweep" / "points"))
  # COCO FID from the script: the same number; process 0 wrote the report and the chunks.
  fid1, fid2 = (
      json.loads((tmp_path / d / "coco" / "fid.json").read_text()) for d in ("single", "multi")
  )
  assert fid1["num_samples"] == fid2["num_samples"] == 5 and fid1["num_reference"] == 4
  np.testing.assert_allclose(fid2["fid"], fid1["fid"], rtol=1e-4)
  d1, d2 = fid1["samples_dir"], fid2["samples_dir"]
  chunks = ["chunk_000000.npz", "chunk_000003.npz"]
  assert sorted(os.listdir(d1)) == sorted(os.listdir(d2)) == chunks
  for name in chunks:
    with np.load(os.path.join(d1, name)) as za, np.load(os.path.join(d2, name)) as zb:
      assert za["images"].shape == (3 if name == chunks[0] else 2, 256, 256, 3)
      assert np.abs(za["images"].astype(int) - zb["images"].astype(int)).max() <= 1
