"""`experiments/coco_guidance_sweep.py --distributed`: 2 processes x 4 fake devices on
127.0.0.1 write the rows (FID, CLIP score per guidance weight) of 1 process x 8 devices. Tiny
random stages, a random FID InceptionV3, the tiny CLIP checkpoint and a fake COCO folder: the
numbers are meaningless, the plumbing real."""

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from imagen_jax.evals import convert_weights
from tests import cascade_fixtures
from tests.test_multihost_eval import CLIP_CKPT, _env, _fake_coco

ROOT = cascade_fixtures.REPO

RUNNER = r"""
import json, runpy, sys
outdir, root, dist = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
argv = [
    "experiments/coco_guidance_sweep.py", f"--workdirs={root}/base,{root}/sr",
    "--config=configs/cascade.py:shapes", "--config.stage1.num_steps=2",
    "--config.stage2.num_steps=2", f"--coco_dir={root}/coco",
    f"--inception={root}/inception.safetensors", f"--clip_path={root}/tiny_clip",
    "--weights=1.5,3", "--thresholds=dynamic", "--num_prompts=5", "--batch_size=8",
    f"--outdir={outdir}"]
if dist:
  argv += ["--distributed", f"--coordinator_address={dist['address']}", "--num_processes=2",
           f"--process_id={dist['id']}"]
sys.argv = argv
try:
  runpy.run_path("experiments/coco_guidance_sweep.py", run_name="__main__")
except SystemExit as e:
  assert not e.code, e.code
"""


@pytest.mark.slow
@pytest.mark.multihost
def test_distributed_coco_sweep_matches_one_process(tmp_path):
  root = tmp_path / "inputs"
  cascade_fixtures.write_tiny_cascade(str(root))
  _fake_coco(root / "coco")
  os.symlink(CLIP_CKPT, root / "tiny_clip")
  convert_weights.save_flax_weights(
      convert_weights.convert_state_dict(convert_weights.random_torch_state_dict(0)),
      str(root / "inception.safetensors"),
  )
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
  single = start(tmp_path / "single", {}, 8)
  _, err = single.communicate(timeout=900)
  assert single.returncode == 0, err[-4000:]
  multi = [start(tmp_path / "multi", {"address": f"127.0.0.1:{port}", "id": i}, 4) for i in (0, 1)]
  outs = [p.communicate(timeout=900) for p in multi]
  for p, (_, err) in zip(multi, outs):
    assert p.returncode == 0, err[-4000:]
  assert "points sampled" in outs[0][0] and "points sampled" not in outs[1][0]  # one writer

  def rows(d):
    with open(tmp_path / d / "results.csv") as f:
      return list(csv.DictReader(f))

  one, two = rows("single"), rows("multi")
  assert len(one) == len(two) == 2
  for a, b in zip(one, two):
    assert a["weight"] == b["weight"] and a["setting"] == b["setting"]
    for k in ("fd", "clip_score"):
      assert np.isfinite(float(a[k])), (k, a)
      np.testing.assert_allclose(float(b[k]), float(a[k]), rtol=1e-4, err_msg=k)
  assert float(one[0]["fd"]) != float(one[1]["fd"])  # the two weights differ
