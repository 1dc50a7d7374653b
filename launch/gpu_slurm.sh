#!/usr/bin/env bash
# Train one stage on a SLURM GPU cluster: one task (JAX process) per node, all its GPUs local.
# jax.distributed.initialize() reads the SLURM environment (coordinator = first node, process
# id = SLURM_PROCID), so only `distributed.initialize` is set.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh WORKDIR CONFIG [--config.x=y ...]
#   e.g. sbatch --nodes=16 --gpus-per-node=8 launch/gpu_slurm.sh /shared/runs/sr256 \
#          configs/sr256.py:paper --config.text.path=/shared/t5-v1_1-xxl
#
# WORKDIR and the data must be on a filesystem shared by all nodes. SLURM sends SIGTERM before
# a time limit / preemption (see --signal); every process saves the current step and exits,
# and resubmitting resumes from it.
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
#SBATCH --job-name=imagen-jax
set -euo pipefail
if [[ $# -lt 2 ]]; then sed -n '2,12p' "$0" >&2; exit 2; fi
WORKDIR=$1; CONFIG=$2; shift 2
srun python -m imagen_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.distributed.initialize=True --config.model.dtype=bfloat16 "$@"
