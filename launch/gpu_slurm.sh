#!/usr/bin/env bash
# Train one stage on a SLURM GPU cluster: submit, check on the job, read its logs, stop it.
# One task (JAX process) per node with all its GPUs; jax.distributed.initialize() reads the
# SLURM environment (coordinator = first node, process id = SLURM_PROCID).
#
#   launch/gpu_slurm.sh start  WORKDIR CONFIG [--config.x=y ...]   submit (sbatch); prints the job id
#   launch/gpu_slurm.sh status WORKDIR
#   launch/gpu_slurm.sh logs   WORKDIR [LINES]    last LINES (default 20) lines of every task's log
#   launch/gpu_slurm.sh stop   WORKDIR            SIGTERM to every task: each saves the step, exits
#
#   e.g. NODES=16 launch/gpu_slurm.sh start /shared/runs/sr256 configs/sr256.py:paper \
#          --config.text.path=/shared/t5-v1_1-xxl
#
# Run it from the repo checkout (installed with `pip install -e .[gpu]`) on a filesystem shared
# by all nodes; WORKDIR and the data must be shared too (or gs://). The job is requeued when it
# is preempted (--requeue) and SLURM sends SIGTERM 120 s before a time limit or preemption
# (--signal): every process saves the current step and exits; the requeued job (or `start`
# again) resumes from it. Logs: LOG_DIR/job_<id>.batch.log and job_<id>.task_<rank>.log
# (appended across requeues); LOG_DIR/job_id names the latest job for status / logs / stop.
#
# Env: NODES (1), GPUS_PER_NODE (8), PARTITION, TIME_LIMIT (e.g. 2-00:00:00), PYTHON (python3),
#      SBATCH_FLAGS (extra sbatch flags), LOG_DIR (WORKDIR/slurm_logs; for a gs:// WORKDIR,
#      ./slurm_logs/<its last path component>).
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --job-name=imagen-jax
set -euo pipefail

# The launcher's directory; a batch job (run from SLURM's copy of this script) gets it from
# the environment `start` submits it with.
HERE=${IMAGEN_LAUNCH_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
# shellcheck source=launch/verbs.sh
source "$HERE/verbs.sh"

[[ $# -ge 1 ]] || usage
VERB=$1
shift
check_verb "$VERB" start status logs stop _job
[[ $# -ge 1 ]] || die "$VERB needs WORKDIR (see --help)"
WORKDIR=$1
shift
if [[ -n ${LOG_DIR:-} ]]; then
  :
elif [[ $WORKDIR == *://* ]]; then
  LOG_DIR=$PWD/slurm_logs/$(basename "$WORKDIR")
else
  LOG_DIR=$WORKDIR/slurm_logs
fi

job_id() {
  [[ -f $LOG_DIR/job_id ]] || die "no job was started for $WORKDIR (no $LOG_DIR/job_id)"
  cat "$LOG_DIR/job_id"
}

start() {
  [[ $# -ge 1 ]] || die "start needs WORKDIR CONFIG [--config.x=y ...] (see --help)"
  mkdir -p "$LOG_DIR"
  if [[ -f $LOG_DIR/job_id ]] && [[ -n $(squeue -h -j "$(cat "$LOG_DIR/job_id")" 2>/dev/null) ]]; then
    die "job $(cat "$LOG_DIR/job_id") of $WORKDIR is still queued or running; stop it first"
  fi
  local flags=(--parsable --nodes="${NODES:-1}" --gpus-per-node="${GPUS_PER_NODE:-8}"
    --output="$LOG_DIR/job_%j.batch.log")
  [[ -z ${PARTITION:-} ]] || flags+=(--partition="$PARTITION")
  [[ -z ${TIME_LIMIT:-} ]] || flags+=(--time="$TIME_LIMIT")
  local extra
  read -r -a extra <<<"${SBATCH_FLAGS:-}"
  local id
  id=$(sbatch "${flags[@]}" "${extra[@]}" \
    --export=ALL,LOG_DIR="$LOG_DIR",GPUS_PER_NODE="${GPUS_PER_NODE:-8}",IMAGEN_LAUNCH_DIR="$HERE" \
    "$0" _job "$WORKDIR" "$@")
  id=${id%%;*} # --parsable prints "id" or "id;cluster"
  echo "$id" >"$LOG_DIR/job_id"
  echo "submitted job $id; logs in $LOG_DIR; check with: $0 status $WORKDIR"
}

# The batch script proper (what sbatch runs on the first node): one srun task per node.
_job() {
  [[ $# -ge 1 ]] || die "_job needs WORKDIR CONFIG"
  local config=$1
  shift
  cd "${SLURM_SUBMIT_DIR:-.}"
  # One process per node drives all its GPUs: without this, jax's SLURM detection would give
  # each process only GPU number SLURM_LOCALID.
  JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((${GPUS_PER_NODE:-8} - 1)))
  export JAX_LOCAL_DEVICE_IDS
  srun --open-mode=append --output="$LOG_DIR/job_%j.task_%t.log" --kill-on-bad-exit=1 \
    "${PYTHON:-python3}" -m imagen_jax.train --config="$config" --workdir="$WORKDIR" \
    --config.distributed.initialize=True --config.model.dtype=bfloat16 "$@"
}

status() {
  local id state
  id=$(job_id)
  state=$(squeue -h -j "$id" -o '%i %T %M %D %R' 2>/dev/null || true)
  if [[ -n $state ]]; then
    echo "job $id: $state (id state elapsed nodes reason)"
  else
    echo "job $id: not queued or running (finished, failed or stopped: see the logs)"
  fi
}

logs() {
  local lines=${1:-20} id f
  [[ $lines =~ ^[0-9]+$ ]] || die "logs: LINES must be a number, got '$lines'"
  id=$(job_id)
  for f in "$LOG_DIR/job_$id".*.log; do
    [[ -f $f ]] || { echo "(no logs of job $id yet in $LOG_DIR)"; break; }
    echo "==== $f"
    tail -n "$lines" "$f"
  done
}

stop() {
  local id
  id=$(job_id)
  # TERM to the job's tasks only: each saves a checkpoint and exits, then the job ends.
  scancel --signal=TERM "$id"
  echo "sent SIGTERM to job $id; \`$0 status $WORKDIR\` shows when it has ended"
}

"$VERB" "$@"
