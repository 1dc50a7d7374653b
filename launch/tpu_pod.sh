#!/usr/bin/env bash
# Train one stage on a Cloud TPU pod slice: the same command on every worker (host).
# jax.distributed.initialize() auto-detects the pod (coordinator, process ids), so only
# `distributed.initialize` is set. Imagen §4.1: base on 256 TPU-v4 chips, each SR on 128.
#
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR CONFIG [--config.x=y ...]
#   e.g. launch/tpu_pod.sh imagen-v4-256 us-central2-b gs://bucket/base64 configs/base64.py:paper \
#          --config.text.path=/mnt/t5-v1_1-xxl --config.data.data_dir=gs://bucket/tfds
#
# Assumes the repo is checked out at ~/imagen-jax on every worker with `pip install -e .[tpu]`,
# and that WORKDIR / data_dir are visible to all hosts (GCS). SIGTERM on preemption makes every
# host save the current step; rerunning the command resumes from it.
set -euo pipefail
if [[ $# -lt 4 ]]; then sed -n '2,13p' "$0" >&2; exit 2; fi
TPU=$1; ZONE=$2; WORKDIR=$3; CONFIG=$4; shift 4
EXTRA=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/imagen-jax && python -m imagen_jax.main --config=$CONFIG --workdir=$WORKDIR \
   --config.distributed.initialize=True $EXTRA"
