"""The pod / cluster launchers as a user runs them, against stubbed `gcloud` and SLURM commands.

`gcloud compute tpus tpu-vm ssh|scp --worker=all`, `sbatch`, `srun`, `squeue` and `scancel`
are small scripts written into tmp_path/bin (first on PATH) that run each worker / task as a
local process on 127.0.0.1 with 4 fake CPU devices, in the environment a cluster gives it
(SLURM's variables; for a TPU "worker", its own home folder, hostname and Open MPI's variables,
the cluster jax detects from variables alone: a real TPU VM is detected from its metadata
server). So `start` really copies the code, starts 2 jax.distributed processes that train the
tiny base stage, `status` / `logs` see them, and `stop` makes them checkpoint and exit.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
GPU_SLURM = os.path.join(ROOT, "launch", "gpu_slurm.sh")

# Environment of a stub worker / task: what a cluster host would have, on 127.0.0.1.
WORKER_ENV = """
def worker_env(**extra):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  env.update({k: str(v) for k, v in extra.items()})
  return env
"""

GCLOUD = """
import glob, os, shutil, subprocess, sys
root, n, port = os.environ["STUB_ROOT"], int(os.environ["STUB_WORKERS"]), os.environ["STUB_PORT"]
assert sys.argv[1:4] == ["compute", "tpus", "tpu-vm"], sys.argv
verb, rest, opts, pos = sys.argv[4], sys.argv[5:], {}, []
while rest:
  a = rest.pop(0)
  if a.startswith("--"):
    k, eq, v = a[2:].partition("=")
    opts[k] = v if eq else (True if k == "recurse" else rest.pop(0))
  else:
    pos.append(a)
if opts.get("worker") != "all" or not opts.get("zone"):
  sys.exit(f"gcloud stub: expected --worker=all and --zone, got {opts}")

def home(tpu, w):
  d = os.path.join(root, tpu, f"worker{w}")
  os.makedirs(d, exist_ok=True)
  return d

def remote(tpu, w, path):
  return os.path.join(home(tpu, w), path[2:] if path.startswith("~/") else path)

if verb == "ssh":
  tpu, procs = pos[0], []
  for w in range(n):
    env = worker_env(HOME=home(tpu, w), HOSTNAME=f"{tpu}-w{w}",
                     JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                     OMPI_MCA_orte_hnp_uri=f"0.0;tcp://127.0.0.1:{port}",
                     OMPI_COMM_WORLD_SIZE=n, OMPI_COMM_WORLD_RANK=w, OMPI_COMM_WORLD_LOCAL_RANK=0)
    procs.append(subprocess.Popen(["bash", "-c", opts["command"]], cwd=env["HOME"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  rc = 0
  for w, p in enumerate(procs):
    out, _ = p.communicate()
    print("".join(f"[worker {w}] {line}" for line in out.splitlines(True)), end="")
    rc = rc or p.returncode
  sys.exit(rc)
elif verb == "scp":
  srcs, dest = pos[:-1], pos[-1]
  for w in range(n):
    if ":" in dest:  # local -> every worker
      tpu, path = dest.split(":", 1)
      for s in srcs:
        shutil.copy(s, remote(tpu, w, path))
    else:  # every worker -> local
      for s in srcs:
        tpu, path = s.split(":", 1)
        for f in glob.glob(remote(tpu, w, path)):
          shutil.copy(f, dest)
else:
  sys.exit(f"gcloud stub: unknown verb {verb}")
"""

SBATCH = """
import os, random, socket, subprocess, sys
args, opts = sys.argv[1:], {}
while args[0].startswith("-"):
  k, _, v = args.pop(0).lstrip("-").partition("=")
  opts[k] = v
script, script_args = args[0], args[1:]
while True:  # jax derives the SLURM coordinator port from the job id: pick a free one
  port = random.randint(61440, 65535)
  with socket.socket() as s:
    try:
      s.bind(("127.0.0.1", port))
      break
    except OSError:
      pass
job = str(4096 + port - 61440)
jobdir = os.path.join(os.environ["STUB_ROOT"], "jobs", job)
os.makedirs(jobdir)
export = dict(kv.split("=", 1) for kv in opts.get("export", "ALL").split(",")[1:])
nodes = opts["nodes"]
env = worker_env(SLURM_JOB_ID=job, SLURM_JOB_NUM_NODES=nodes, SLURM_NNODES=nodes,
                 SLURM_SUBMIT_DIR=os.getcwd(), SLURM_JOB_NODELIST="127.0.0.1", **export)
out = open(opts["output"].replace("%j", job), "a")
p = subprocess.Popen(["bash", script] + script_args, env=env, stdout=out, stderr=subprocess.STDOUT,
                     stdin=subprocess.DEVNULL, start_new_session=True)
with open(os.path.join(jobdir, "pid"), "w") as f:
  f.write(str(p.pid))
print(job if "parsable" in opts else f"Submitted batch job {job}")
"""

SRUN = """
import os, signal, subprocess, sys
args, opts = sys.argv[1:], {}
while args[0].startswith("-"):
  k, _, v = args.pop(0).lstrip("-").partition("=")
  opts[k] = v
job, n = os.environ["SLURM_JOB_ID"], int(os.environ["SLURM_JOB_NUM_NODES"])
tasks = []
for t in range(n):
  out = open(opts["output"].replace("%j", job).replace("%t", str(t)), "a")
  env = worker_env(SLURM_PROCID=t, SLURM_NTASKS=n, SLURM_STEP_NODELIST="127.0.0.1",
                   SLURM_LOCALID=0, SLURM_NODEID=t, SLURM_STEP_NUM_NODES=n, SLURM_STEP_NUM_TASKS=n)
  tasks.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT))
with open(os.path.join(os.environ["STUB_ROOT"], "jobs", job, "tasks"), "w") as f:
  f.write(" ".join(str(p.pid) for p in tasks))
signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in tasks])
rcs = [p.wait() for p in tasks]
sys.exit(next((rc for rc in rcs if rc), 0))
"""

SQUEUE = """
import os, sys
args = sys.argv[1:]
job = args[args.index("-j") + 1]
try:
  pid = int(open(os.path.join(os.environ["STUB_ROOT"], "jobs", job, "pid")).read())
  os.kill(pid, 0)
  print(f"{job} RUNNING 0:42 2 127.0.0.1")
except (OSError, ValueError):
  if "-h" not in args:
    print("JOBID STATE TIME NODES NODELIST(REASON)")
"""

SCANCEL = """
import os, signal, sys
args = sys.argv[1:]
sig = next((a.split("=", 1)[1] for a in args if a.startswith("--signal=")), None)
job = [a for a in args if not a.startswith("-")][0]
jobdir = os.path.join(os.environ["STUB_ROOT"], "jobs", job)
if sig:  # --signal without --full: the job's tasks only
  for pid in open(os.path.join(jobdir, "tasks")).read().split():
    os.kill(int(pid), getattr(signal, "SIG" + sig))
else:
  os.killpg(int(open(os.path.join(jobdir, "pid")).read()), signal.SIGKILL)
"""

# The tiny base stage cut to one resolution level on a (data 4, fsdp 2) mesh over 2 x 4 devices.
TRAIN_FLAGS = [
    "--config.train.progress_bar=False",
    "--config.train.log_every=1",
    "--config.train.ckpt_every=1000",
    "--config.train.num_steps=100000",
    "--config.model.channel_mult=(1,)",
    "--config.model.attn_resolutions=(16,)",
    "--config.mesh.shape.data=4",
    "--config.mesh.shape.fsdp=2",
]


def _stub_bin(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in [
      ("gcloud", GCLOUD),
      ("sbatch", SBATCH),
      ("srun", SRUN),
      ("squeue", SQUEUE),
      ("scancel", SCANCEL),
  ]:
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(WORKER_ENV) + textwrap.dedent(body))
    path.chmod(0o755)
  return bin_dir


@pytest.fixture
def cluster(tmp_path):
  """(env for the launcher, stub state folder); kills whatever a failed test left running."""
  state = tmp_path / "cluster"
  state.mkdir()
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(
      os.environ,
      PATH=f"{_stub_bin(tmp_path)}:{os.environ['PATH']}",
      STUB_ROOT=str(state),
      STUB_WORKERS="2",
      STUB_PORT=str(port),
      PYTHON=sys.executable,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  env.pop("PYTHONPATH", None)  # the workers import the code they were given, from their cwd
  yield env, state
  for pid_file in [*state.rglob("run.pid"), *state.rglob("tasks"), *state.rglob("pid")]:
    for pid in pid_file.read_text().split():
      try:
        os.kill(int(pid), signal.SIGKILL)
      except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The tiny shapes data, built once here (the runs' processes only read it)."""
  from configs import base64
  from imagen_jax.data import shapes

  d, c = tmp_path_factory.mktemp("data"), base64.get_config("tiny").data
  shapes.build_shapes(
      str(d), c.resolution, num_train=c.num_train, num_test=c.num_test, seed=c.shapes_seed
  )
  return d


def _sh(args, env, cwd=ROOT, ok=True):
  out = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
  if ok:
    assert out.returncode == 0, f"{args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
  return out


def _wait_for_steps(metrics, n, logs, running, timeout=800):
  """Waits until the run logged n steps to its metrics file; returns the logged steps. Fails at
  once, with the logs, when `running()` says the run has ended."""
  t0, polls = time.time(), 0
  while time.time() - t0 < timeout:
    if metrics.exists():
      steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line]
      if len(steps) >= n:
        return steps
    polls += 1
    if polls % 5 == 0 and not running():  # every 10 s: a status call is a few processes
      pytest.fail(f"the run ended before {n} training steps; logs:\n" + logs())
    time.sleep(2)
  pytest.fail(f"no {n} training steps after {timeout}s; logs:\n" + logs())


def test_multihost_launcher_errors_name_the_verb_and_args(tmp_path):
  env = dict(os.environ, PATH=f"{_stub_bin(tmp_path)}:{os.environ['PATH']}")
  for script, name in [(TPU_POD, "tpu_pod.sh"), (GPU_SLURM, "gpu_slurm.sh")]:
    out = _sh(["bash", script], env, ok=False)
    assert out.returncode == 2 and "status" in out.stderr and "stop" in out.stderr
    out = _sh(["bash", script, "launch"], env, ok=False)
    assert out.returncode == 2
    assert f"{name}: unknown verb 'launch'; allowed: start, " in out.stderr
  out = _sh(["bash", TPU_POD, "status", "my-tpu"], env, ok=False)
  assert out.returncode == 2 and "status needs TPU and ZONE" in out.stderr
  out = _sh(["bash", TPU_POD, "start", "my-tpu", "us-central2-b", "gs://b/run"], env, ok=False)
  assert out.returncode == 2 and "start needs TPU ZONE WORKDIR CONFIG" in out.stderr
  out = _sh(["bash", TPU_POD, "logs", "my-tpu", "z", "many"], env, ok=False)
  assert "LINES must be a number, got 'many'" in out.stderr
  out = _sh(["bash", GPU_SLURM, "status", str(tmp_path / "run")], env, ok=False)
  assert out.returncode == 2 and "no job was started for" in out.stderr
  with open(GPU_SLURM) as f:  # preemption: requeued, SIGTERM ahead of the kill
    header = f.read()
  assert "#SBATCH --requeue" in header and "#SBATCH --signal=TERM@120" in header


@pytest.mark.slow
@pytest.mark.multihost
def test_multihost_launcher_tpu_pod_start_status_logs_stop(cluster, data_dir, tmp_path):
  env, state = cluster
  workdir = tmp_path / "run"
  tpu = ["my-tpu", "us-central2-b"]
  env["INSTALL"] = "echo installed-in=$PWD >> ~/install.log"  # pip install: see the report
  env["LOG_SYNC_SECONDS"] = "1"
  flags = [f"--config.data.data_dir={data_dir}"] + TRAIN_FLAGS
  out = _sh(["bash", TPU_POD, "start", *tpu, str(workdir), "configs/base64.py:tiny", *flags], env)
  assert out.stdout.count("started pid") == 2, out.stdout
  workers = [state / "my-tpu" / f"worker{w}" / "imagen-jax" for w in (0, 1)]
  for w in workers:  # the code was copied (untracked files included), then installed from it
    assert (w / "src" / "imagen_jax" / "sampling" / "hosts.py").is_file()
    assert (w / "src" / "launch" / "tpu_pod.sh").is_file()
    assert (w.parent / "install.log").read_text().strip() == f"installed-in={w / 'src'}"

  def logs():
    return _sh(["bash", TPU_POD, "logs", *tpu, "2000"], env, ok=False).stdout

  def running():
    status = _sh(["bash", TPU_POD, "status", *tpu], env, ok=False).stdout
    return status.count(": running (pid") == 2  # a dead worker leaves the other one waiting

  _wait_for_steps(workdir / "metrics.jsonl", 2, logs, running)
  status = _sh(["bash", TPU_POD, "status", *tpu], env).stdout
  assert status.count(": running (pid") == 2, status
  assert "my-tpu-w0" in status and "my-tpu-w1" in status
  out = logs()
  assert "==== my-tpu-w0" in out and "==== my-tpu-w1" in out
  assert "process 1/2, 4 local / 8 global devices" in out, out  # both joined one job
  again = _sh(
      ["bash", TPU_POD, "start", *tpu, str(workdir), "configs/base64.py:tiny"], env, ok=False
  )
  assert again.returncode != 0 and "a run is already going" in again.stdout + again.stderr

  out = _sh(["bash", TPU_POD, "stop", *tpu], env)
  assert out.stdout.count("stopped (saved step") == 2, out.stdout
  saved = int(out.stdout.split("saved step ")[1].split(")")[0])
  assert (workdir / "checkpoints" / str(saved)).is_dir()
  logged = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert logged == list(range(1, saved + 1))  # every step logged, up to the saved one
  status = _sh(["bash", TPU_POD, "status", *tpu], env).stdout
  assert status.count(": not running") == 2, status
  _sh(["bash", TPU_POD, "fetch", *tpu, str(tmp_path / "fetched")], env)
  fetched = sorted(os.listdir(tmp_path / "fetched"))
  assert fetched == ["my-tpu-w0.log", "my-tpu-w1.log"]
  assert f"(SIGTERM): saved step {saved} " in (tmp_path / "fetched" / "my-tpu-w1.log").read_text()
  # The per-worker logs are in the workdir too (launch/sync_log.py's last copy, after the exit).
  for _ in range(60):
    in_workdir = [workdir / "logs" / f"my-tpu-w{w}.log" for w in (0, 1)]
    if all(p.is_file() and f"saved step {saved}" in p.read_text() for p in in_workdir):
      break
    time.sleep(1)
  else:
    pytest.fail(f"no final worker logs in {workdir / 'logs'}: {list((workdir / 'logs').glob('*'))}")

  # `run`: any script (e.g. the multi-host FID) the same way on every worker; with GIT_REF
  # the workers clone that ref instead of receiving a copy.
  head = _sh(["git", "rev-parse", "HEAD"], env).stdout.strip()
  env.update(GIT_REF=head, GIT_URL=ROOT)
  _sh(["bash", TPU_POD, "run", *tpu, "-c", "import os; print('hi from', os.getcwd())"], env)
  for _ in range(60):
    if _sh(["bash", TPU_POD, "status", *tpu], env).stdout.count(": not running") == 2:
      break
    time.sleep(1)
  out = logs()
  for w in workers:
    assert _sh(["git", "-C", str(w / "src"), "rev-parse", "HEAD"], env).stdout.strip() == head
    assert f"hi from {w / 'src'}" in out, out


@pytest.mark.slow
@pytest.mark.multihost
def test_multihost_launcher_gpu_slurm_start_status_logs_stop(cluster, data_dir, tmp_path):
  env, state = cluster
  workdir = tmp_path / "run"
  env["NODES"] = "2"
  # float32: the tiny CPU run shares its compiled programs with the TPU test's (cache).
  flags = [f"--config.data.data_dir={data_dir}"] + TRAIN_FLAGS
  flags.append("--config.model.dtype=float32")
  out = _sh(["bash", GPU_SLURM, "start", str(workdir), "configs/base64.py:tiny", *flags], env)
  job = (workdir / "slurm_logs" / "job_id").read_text().strip()
  assert f"submitted job {job}" in out.stdout

  def logs():
    return _sh(["bash", GPU_SLURM, "logs", str(workdir), "2000"], env, ok=False).stdout

  def running():
    status = _sh(["bash", GPU_SLURM, "status", str(workdir)], env, ok=False).stdout
    return "not queued or running" not in status

  _wait_for_steps(workdir / "metrics.jsonl", 2, logs, running)
  status = _sh(["bash", GPU_SLURM, "status", str(workdir)], env).stdout
  assert f"job {job}: {job} RUNNING" in status, status
  out = logs()
  for t in (0, 1):
    assert f"job_{job}.task_{t}.log" in out
  assert "process 1/2, 4 local / 8 global devices" in out, out
  again = _sh(["bash", GPU_SLURM, "start", str(workdir), "configs/base64.py:tiny"], env, ok=False)
  assert again.returncode == 2 and "is still queued or running; stop it first" in again.stderr

  _sh(["bash", GPU_SLURM, "stop", str(workdir)], env)
  pid = int((state / "jobs" / job / "pid").read_text())
  for _ in range(300):  # the tasks checkpoint and exit, then the batch script ends
    if "not queued or running" in _sh(["bash", GPU_SLURM, "status", str(workdir)], env).stdout:
      break
    time.sleep(1)
  else:
    pytest.fail("the job did not end after SIGTERM:\n" + logs())
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)
  task_logs = [(workdir / "slurm_logs" / f"job_{job}.task_{t}.log").read_text() for t in (0, 1)]
  saved = int(re.search(r"\(SIGTERM\): saved step (\d+)", task_logs[0]).group(1))
  assert f"(SIGTERM): saved step {saved} " in task_logs[1]
  assert (workdir / "checkpoints" / str(saved)).is_dir()
