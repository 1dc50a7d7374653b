#!/usr/bin/env bash
# Train one stage on a Cloud TPU pod slice: copy the code to every worker, install it, start the
# run detached on all workers (it survives a dropped ssh), then check on it, read its logs, stop it.
#
#   launch/tpu_pod.sh start  TPU ZONE WORKDIR CONFIG [--config.x=y ...]
#   launch/tpu_pod.sh run    TPU ZONE SCRIPT [ARGS ...]  `python SCRIPT ARGS` the same way, e.g.
#                              experiments/coco_fid30k.py --distributed ... (multi-host FID)
#   launch/tpu_pod.sh status TPU ZONE
#   launch/tpu_pod.sh logs   TPU ZONE [LINES]     last LINES (default 20) lines of every worker's log
#   launch/tpu_pod.sh fetch  TPU ZONE DEST        copy every worker's log into the local folder DEST
#   launch/tpu_pod.sh stop   TPU ZONE             SIGTERM: every worker saves the step and exits
#
#   e.g. launch/tpu_pod.sh start imagen-v4-256 us-central2-b gs://bucket/base64 \
#          configs/base64.py:paper --config.text.path=/mnt/t5-v1_1-xxl \
#          --config.data.name=records --config.data.data_dir=gs://bucket/laion400m_records
#
# start: this checkout's files (tracked and untracked, not git-ignored) go to ~/imagen-jax/src on
# every worker, or, with GIT_REF set, the workers clone GIT_URL (default: this checkout's origin)
# at that ref. INSTALL then runs in src, and the run starts under setsid/nohup with its output in
# ~/imagen-jax/logs/<worker hostname>.log on each worker, copied to WORKDIR/logs/ every
# LOG_SYNC_SECONDS (60) and when the run ends (launch/sync_log.py; a bucket too).
# jax.distributed.initialize() auto-detects the pod (coordinator, process ids): only `distributed.initialize` is set.
# WORKDIR and data_dir must be visible to all hosts (gs://). After a preemption, `start` again
# resumes from the last checkpoint in WORKDIR. Imagen §4.1: base on 256 TPU-v4 chips, SR on 128.
#
# Env: PYTHON (python3), INSTALL (`$PYTHON -m pip install -q -e .[tpu]`), GIT_REF, GIT_URL,
#      STOP_TIMEOUT (seconds `stop` waits for the checkpoint; 600), LOG_SYNC_SECONDS (60),
#      GCLOUD_FLAGS (extra flags for every gcloud call, e.g. "--project=P --internal-ip").
set -euo pipefail

# shellcheck source=launch/verbs.sh
source "$(dirname "${BASH_SOURCE[0]}")/verbs.sh"

[[ $# -ge 1 ]] || usage
VERB=$1
shift
check_verb "$VERB" start run status logs fetch stop
[[ $# -ge 2 ]] || die "$VERB needs TPU and ZONE (see --help)"
TPU=$1
ZONE=$2
shift 2

PY=${PYTHON:-python3}
REMOTE=imagen-jax # under the worker's home: src/ (code), logs/, run.pid
read -r -a GFLAGS <<<"${GCLOUD_FLAGS:-}"

# Runs a bash script on every worker (as one `bash -c` command; $HOSTNAME is the worker's).
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all "${GFLAGS[@]}" \
    --command="bash -c $(printf '%q' "$1")"
}

# Shell lines shared by the remote scripts: paths and "is the run alive?".
COMMON="set -euo pipefail
D=~/$REMOTE
LOG=\$D/logs/\$HOSTNAME.log
running() { [[ -f \$D/run.pid ]] && kill -0 \"\$(cat \$D/run.pid)\" 2>/dev/null; }"

# Copies (or clones) the code to every worker, installs it, and starts `$PY ARGS...` detached.
launch_detached() {
  local install=${INSTALL:-"$PY -m pip install -q -e '.[tpu]'"}
  local cmd fetch_code sync_log=""
  cmd=$(printf '%q ' "$PY" "$@")
  if [[ -n ${LOG_DEST:-} ]]; then # a copy of each worker's log in LOG_DEST (the workdir's logs/)
    sync_log="setsid nohup $(printf '%q ' "$PY" launch/sync_log.py) \$(cat \$D/run.pid) \$LOG \
$(printf '%q' "$LOG_DEST")/\$HOSTNAME.log --every=${LOG_SYNC_SECONDS:-60} >/dev/null 2>&1 </dev/null &"
  fi
  if [[ -n ${GIT_REF:-} ]]; then
    local url=${GIT_URL:-$(git -C "$(dirname "$0")" remote get-url origin 2>/dev/null || true)}
    [[ -n $url ]] || die "GIT_REF=$GIT_REF needs GIT_URL (this checkout has no origin remote)"
    fetch_code="rm -rf \$D/src && git clone --quiet $(printf '%q' "$url") \$D/src && \
git -C \$D/src checkout --quiet $(printf '%q' "$GIT_REF")"
  else
    local repo archive
    repo=$(cd "$(dirname "$0")/.." && pwd)
    archive=$(mktemp -d)/imagen-jax-src.tgz
    # Tracked and untracked files that git does not ignore, minus tracked files deleted here.
    git -C "$repo" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do if [[ -e $repo/$f ]]; then printf '%s\0' "$f"; fi; done |
      tar -C "$repo" --null -T - -czf "$archive"
    echo "copying $(du -h "$archive" | cut -f1) of code from $repo to every worker of $TPU"
    gcloud compute tpus tpu-vm scp "$archive" "$TPU:imagen-jax-src.tgz" --zone="$ZONE" \
      --worker=all "${GFLAGS[@]}"
    rm -rf "$(dirname "$archive")"
    fetch_code="rm -rf \$D/src && mkdir -p \$D/src && tar -xzf ~/imagen-jax-src.tgz -C \$D/src"
  fi
  on_all_workers "$COMMON
mkdir -p \$D/logs
if running; then
  echo \"\$HOSTNAME: a run is already going (pid \$(cat \$D/run.pid)); stop it first\" >&2
  exit 1
fi
$fetch_code
cd \$D/src
$install
setsid nohup $cmd >\$LOG 2>&1 </dev/null &
echo \$! >\$D/run.pid
$sync_log
echo \"\$HOSTNAME: started pid \$(cat \$D/run.pid), log \$LOG\""
  echo "started on every worker of $TPU; check with: $0 status $TPU $ZONE"
}

start() {
  [[ $# -ge 2 ]] || die "start needs TPU ZONE WORKDIR CONFIG [--config.x=y ...] (see --help)"
  local workdir=$1 config=$2
  shift 2
  LOG_DEST=${workdir%/}/logs launch_detached -m imagen_jax.train --config="$config" \
    --workdir="$workdir" --config.distributed.initialize=True "$@"
}

run() {
  [[ $# -ge 1 ]] || die "run needs TPU ZONE SCRIPT [ARGS ...] (see --help)"
  launch_detached "$@"
}

status() {
  on_all_workers "$COMMON
if running; then state=\"running (pid \$(cat \$D/run.pid))\"; else state='not running'; fi
last=\$( [[ -f \$LOG ]] && tail -n 1 \$LOG || echo 'no log')
echo \"\$HOSTNAME: \$state; last log line: \$last\""
}

logs() {
  local lines=${1:-20}
  [[ $lines =~ ^[0-9]+$ ]] || die "logs: LINES must be a number, got '$lines'"
  on_all_workers "$COMMON
echo \"==== \$HOSTNAME: \$LOG\"
if [[ -f \$LOG ]]; then tail -n $lines \$LOG; else echo '(no log yet)'; fi"
}

fetch() {
  [[ $# -ge 1 ]] || die "fetch needs a local folder DEST (see --help)"
  mkdir -p "$1"
  gcloud compute tpus tpu-vm scp "$TPU:$REMOTE/logs/*.log" "$1/" --zone="$ZONE" --worker=all \
    "${GFLAGS[@]}"
  echo "logs of every worker of $TPU in $1"
}

stop() {
  local timeout=${STOP_TIMEOUT:-600}
  on_all_workers "$COMMON
if ! running; then echo \"\$HOSTNAME: not running\"; exit 0; fi
pid=\$(cat \$D/run.pid)
kill -TERM \$pid
for ((i = 0; i < $timeout; i++)); do kill -0 \$pid 2>/dev/null || break; sleep 1; done
if kill -0 \$pid 2>/dev/null; then
  echo \"\$HOSTNAME: pid \$pid still running after ${timeout}s (kill -KILL \$pid to force)\" >&2
  exit 1
fi
echo \"\$HOSTNAME: stopped (\$(grep -o 'saved step [0-9]*' \$LOG | tail -n 1 || echo 'no checkpoint saved'))\""
}

"$VERB" "$@"
