#!/usr/bin/env bash
# One training process per GPU, started by srun (slurm/train_64k.sh): torch.distributed's
# env:// variables from the Slurm task's own, then `exec` the command.
#
#   srun ... bash slurm/srun_task.sh python -m megatron_longalign.train [overrides...]
#
# exec, not a child process: the training process IS the Slurm task, so the signals srun
# forwards (SIGUSR1 for preemption) reach Python directly, and its exit status is the
# task's. MASTER_ADDR and MASTER_PORT come from the batch script's environment.
set -euo pipefail

: "${SLURM_PROCID:?srun_task.sh runs as an srun task (SLURM_PROCID is not set)}"
: "${MASTER_ADDR:?set MASTER_ADDR (train_64k.sh derives it from SLURM_JOB_NODELIST)}"
: "${MASTER_PORT:?set MASTER_PORT (train_64k.sh derives it from SLURM_JOB_ID)}"

export RANK="$SLURM_PROCID"
export LOCAL_RANK="${SLURM_LOCALID:?SLURM_LOCALID is not set}"
export WORLD_SIZE="${SLURM_NTASKS:?SLURM_NTASKS is not set}"
# Node rank and tasks per node, as torchrun would set them (read by some libraries).
export GROUP_RANK="${SLURM_NODEID:-0}"
export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE:-${LOCAL_WORLD_SIZE:-1}}"
LOCAL_WORLD_SIZE="${LOCAL_WORLD_SIZE%%(*}"  # Slurm may write "8(x2)": keep the count

exec "$@"
