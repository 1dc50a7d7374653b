"""Subprocess training runs (slow): exact resume after SIGKILL, and 2 processes x 4 fake
devices on 127.0.0.1 matching 1 process x 8 devices.

Every run uses the tiny base stage cut to one resolution level (compiles dominate CPU time)
and a shared persistent compilation cache, so identical programs compile once.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNNER = r"""
import json, os, signal, sys, time
workdir, overrides, kill_at, kill_after_ckpt = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
from configs import base64 as base64_config
config = base64_config.get_config("tiny")
for path, value in overrides.items():
    *sections, field = path.split(".")
    node = config
    for s in sections:
        node = node[s]
    node[field] = tuple(value) if isinstance(value, list) else value
from imagen_jax.parallel import mesh as mesh_lib
mesh_lib.maybe_initialize_distributed(config.distributed)
import jax, numpy as np
from jax.experimental import multihost_utils
from imagen_jax.train import trainer

def kill_hook(step, state, metrics):
    if step == kill_at:
        done = os.path.join(workdir, "checkpoints", str(kill_after_ckpt))
        for _ in range(600):  # wait for the async save to be finalized (renamed into place)
            if os.path.isdir(done):
                break
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGKILL)

out = trainer.train_and_evaluate(config, workdir, hooks=[kill_hook] if kill_at else [])
params = multihost_utils.process_allgather(out["state"].params, tiled=True)
flat = {jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
if jax.process_index() == 0:
    np.savez(os.path.join(workdir, "final_params.npz"), **flat)
"""


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def base_overrides(data_dir, **extra):
  o = {
      "data.data_dir": str(data_dir),
      "train.progress_bar": False,
      "train.log_every": 5,
      "train.ckpt_every": 10,
      "model.channel_mult": [1],
      "model.attn_resolutions": [16],
      "mesh.shape": {"data": 4, "fsdp": 2, "tensor": 1},
  }
  o.update(extra)
  return o


def env(devices):
  e = dict(os.environ)
  e.update(
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      JAX_PLATFORMS="cpu",
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
      PYTHONPATH=ROOT,
  )
  return e


def run(tmp_path, workdir, overrides, *, kill_at=0, kill_after_ckpt=0, devices=8, process_env=None):
  script = tmp_path / "runner.py"
  script.write_text(RUNNER)
  return subprocess.run(
      [
          sys.executable,
          str(script),
          str(workdir),
          json.dumps(overrides),
          str(kill_at),
          str(kill_after_ckpt),
          ROOT,
      ],
      env=process_env or env(devices),
      capture_output=True,
      text=True,
      timeout=900,
  )


def load(workdir):
  with np.load(os.path.join(workdir, "final_params.npz")) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path, data_dir):
  overrides = base_overrides(data_dir, **{"train.num_steps": 20})
  full = run(tmp_path, tmp_path / "full", overrides)
  assert full.returncode == 0, full.stderr[-3000:]
  killed = run(tmp_path, tmp_path / "killed", overrides, kill_at=13, kill_after_ckpt=10)
  assert killed.returncode == -9, killed.stderr[-3000:]
  steps = sorted(os.listdir(tmp_path / "killed" / "checkpoints"))
  assert "10" in steps and "20" not in steps
  resumed = run(tmp_path, tmp_path / "killed", overrides)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  # It resumed from step 10 (a fresh start would have logged steps 5 and 10 again).
  with open(tmp_path / "killed" / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [5, 10, 15, 20]
  a, b = load(tmp_path / "full"), load(tmp_path / "killed")
  assert a.keys() == b.keys()
  for k in a:  # same programs, same data, same randomness: bit-identical
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.multihost
def test_two_processes_match_one(tmp_path, data_dir):
  """2 processes x 4 devices vs 1 process x 8 devices, same (data=4, fsdp=2) mesh; the global
  batches are identical (each process reads its slice of the global stream). Tolerance: only the reduction
  order of the cross-process all-reduces (gloo) differs, float32 rounding ~1e-7 relative,
  amplified a little by Adafactor's normalisation over 8 steps: 1e-5."""
  overrides = base_overrides(data_dir, **{"train.num_steps": 8, "train.ckpt_every": 4})
  single = run(tmp_path, tmp_path / "single", overrides)
  assert single.returncode == 0, single.stderr[-3000:]
  port = free_port()
  procs = []
  for i in range(2):
    o = dict(
        overrides,
        **{
            "distributed.initialize": True,
            "distributed.coordinator_address": f"127.0.0.1:{port}",
            "distributed.num_processes": 2,
            "distributed.process_id": i,
            "distributed.cpu_collectives": "gloo",
        },
    )
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    procs.append(
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "multi"), json.dumps(o), "0", "0", ROOT],
            env=env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # One global data position, whatever the process count.
  for run_dir in ("single", "multi"):
    items = os.listdir(tmp_path / run_dir / "checkpoints" / "8")
    assert {"data_position", "ema_params", "train_state"} <= set(items)
    assert not [i for i in items if i.startswith("data_iter")]
  a, b = load(tmp_path / "single"), load(tmp_path / "multi")
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)
