"""`parallel.ready`: a process that reaches a program's first collective long after its peer
(a slow compile on a loaded machine) still runs it, since every process compiles, then meets the
others at a coordination-service barrier, before any runs it. 2 processes x 2 fake CPU devices
on 127.0.0.1, gloo collectives (whose own wait for a peer is 30 s)."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from imagen_jax.parallel import ready

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNNER = r"""
import json, os, sys, time
pid, port, late_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from jax.sharding import NamedSharding, PartitionSpec as P
from imagen_jax.parallel import ready

mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
x = jax.make_array_from_process_local_data(
    NamedSharding(mesh, P("data")), np.arange(2, dtype=np.float32) + 2 * pid
)
# A reduction over both processes' devices: its first run creates the gloo context.
total = ready.ReadyJit(jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P())), "sum")
if pid == 1:
  time.sleep(late_s)  # the late peer: a compile that took minutes longer on this process
first = float(total(x))
ready.wait_for_peers("again")  # a repeated name is a new barrier
ready.wait_for_peers("again")
print(json.dumps({"pid": pid, "sum": first, "again": float(total(x))}), flush=True)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multihost
def test_multihost_late_peer_waits_at_the_barrier_not_in_gloo():
  port, late_s = _free_port(), 40.0  # past gloo's 30 s
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", RUNNER, str(i), str(port), str(late_s)],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  rows = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  assert [r["sum"] for r in rows] == [6.0, 6.0]  # 0 + 1 + 2 + 3 on both processes
  assert [r["again"] for r in rows] == [6.0, 6.0]


def test_single_process_ready_is_a_plain_call():
  ready.wait_for_peers("nobody")  # one process: returns at once
  f = ready.ReadyJit(jax.jit(lambda a: a * 2), "double")
  assert float(f(jnp.float32(3.0))) == 6.0
  assert "mul" in f.lower(jnp.float32(1.0)).as_text()
