#!/usr/bin/env bash
# Run one training job as N local JAX processes on 127.0.0.1, each with K fake CPU devices.
# Exercises the multi-host code paths (jax.distributed, each host's slice of the global batch,
# cross-process collectives via gloo, the coordination service's preemption sync point) on one
# machine.
#
#   launch/local_multiprocess.sh N K WORKDIR CONFIG [--config.x=y ...]
#   e.g. launch/local_multiprocess.sh 2 4 /tmp/run configs/base64.py:tiny --config.train.num_steps=5
#
# Env: PORT (coordinator port; default: a free one), PYTHON (default: python).
# Logs: WORKDIR/logs/process_<i>.log. Exit status: the first failing process's, else 0.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
N=$1; K=$2; WORKDIR=$3; CONFIG=$4; shift 4
PY=${PYTHON:-python}
PORT=${PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$WORKDIR/logs"
pids=()
for ((i = 0; i < N; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$K ${XLA_FLAGS:-}" JAX_PLATFORMS=cpu \
    "$PY" -m imagen_jax.train --config="$CONFIG" --workdir="$WORKDIR" \
      --config.distributed.initialize=True \
      --config.distributed.coordinator_address="127.0.0.1:$PORT" \
      --config.distributed.num_processes="$N" \
      --config.distributed.process_id="$i" \
      --config.distributed.cpu_collectives=gloo \
      "$@" >"$WORKDIR/logs/process_$i.log" 2>&1 &
  pids+=($!)
done
# Forward Ctrl-C / SIGTERM (preemption) to every process: each checkpoints and exits.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
rc=0
for pid in "${pids[@]}"; do
  wait "$pid" || { status=$?; [[ $rc -eq 0 ]] && rc=$status; }
done
exit $rc
