#!/usr/bin/env bash
# LongAlign instruction tuning at 64k tokens on a multi-node GPU cluster
# (conf/experiment/train_64k.yaml; docs/CLUSTER.md explains every step).
#
#   mkdir -p logs    # Slurm does not create the --output directory itself
#   sbatch slurm/train_64k.sh [hydra overrides...]
#   sbatch --nodes=1 -J la-64k-try2 slurm/train_64k.sh data.sources.0.prefix=data/long
#   EXPERIMENT=train_128k CONTAINER_IMAGE=/images/longalign.sqsh sbatch slurm/train_64k.sh
#
# One training process per GPU, started by srun directly (no torchrun; see "Signals"
# below). Every variable below can be set in the environment; the arguments are Hydra
# overrides, passed through after the ones this script derives, so they win.
#
# Signals and requeue: `--signal=B:USR1@600` has Slurm send SIGUSR1 to this batch shell
# 10 minutes before the time limit. The trap forwards it to srun, which forwards it to
# every task; the training finishes its current step, saves a checkpoint and exits with
# status 75 (megatron_longalign/training/preemption.py). On 75 this script runs
# `scontrol requeue`: the same job id comes back with SLURM_RESTART_COUNT + 1, the same
# run directory (train.resume=auto continues from `latest`) and the same wandb run.
#SBATCH --job-name=longalign-64k
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

: "${SLURM_JOB_ID:?run inside a Slurm job: sbatch slurm/train_64k.sh [overrides...]}"
# Must match megatron_longalign/training/preemption.py (a test checks it).
readonly PREEMPTED_EXIT_CODE=75

# ---- settings (all overridable from the environment) -------------------------------------
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
PYTHON="${PYTHON:-python}"
EXPERIMENT="${EXPERIMENT:-train_64k}"  # conf/experiment/<name>.yaml; empty: none
JOB_NAME="${SLURM_JOB_NAME:-longalign-64k}"
# The job name in paths and the wandb id (which allows only [A-Za-z0-9._-]).
SAFE_NAME="${JOB_NAME//[^A-Za-z0-9._-]/-}"
NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
CPUS_PER_TASK="${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-12}}"
RESTART_COUNT="${SLURM_RESTART_COUNT:-0}"
# Checkpoints and wandb files: keyed by the job name, not the id, so a requeue (same id)
# and a manual resubmission with the same -J both continue from `latest`. Use another
# -J or RUN_DIR for a fresh run.
RUN_DIR="${RUN_DIR:-$REPO_DIR/outputs/$SAFE_NAME}"
# This job's logs: one directory per job, one subdirectory per attempt (requeue).
LOG_DIR="${LOG_DIR:-$REPO_DIR/logs/$SAFE_NAME-$SLURM_JOB_ID}"
ATTEMPT_DIR="$LOG_DIR/attempt-$RESTART_COUNT"
# The same wandb run across requeues (same job id).
WANDB_RUN_ID="${WANDB_RUN_ID:-$SAFE_NAME-$SLURM_JOB_ID}"
# Rendezvous: the first node of the allocation, and a port derived from the job id, so
# that jobs sharing a node do not collide and a requeued job finds the same value.
if [[ -z "${MASTER_ADDR:-}" ]]; then
    # The whole list, then its first line: `| head -n 1` could SIGPIPE scontrol, which
    # pipefail would turn into a failed job.
    hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
    MASTER_ADDR="${hosts%%$'\n'*}"
fi
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
# Optional container (pyxis/enroot): the repository is mounted at the same path.
CONTAINER_IMAGE="${CONTAINER_IMAGE:-}"
CONTAINER_MOUNTS="${CONTAINER_MOUNTS:-$REPO_DIR:$REPO_DIR}"
NCCL_ENV_FILE="${NCCL_ENV_FILE:-$REPO_DIR/slurm/nccl_env.sh}"
REQUEUE="${REQUEUE:-1}"      # 1: requeue after a preemption save (status 75)
SRUN_WAIT="${SRUN_WAIT:-600}"  # seconds the other tasks may run on after one has exited
GPU_BIND="${GPU_BIND-none}"  # every task sees all GPUs of its node and uses LOCAL_RANK
SRUN_ARGS="${SRUN_ARGS:-}"   # extra srun options, space-separated
DRY_RUN="${DRY_RUN:-0}"      # 1: print the srun commands instead of running them
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1
export MASTER_ADDR MASTER_PORT

# shellcheck source=nccl_env.sh source-path=SCRIPTDIR
source "$NCCL_ENV_FILE"

# ---- the commands --------------------------------------------------------------------------
overrides=()
if [[ -n "$EXPERIMENT" ]]; then overrides+=("+experiment=$EXPERIMENT"); fi
overrides+=(
    "train.output_dir=$RUN_DIR"
    "train.resume=auto"
    "logging.wandb.run_id=$WANDB_RUN_ID"
    "logging.progress_bar=false"  # the rank logs are files: no tqdm bars in them
    "hydra.run.dir=$ATTEMPT_DIR/hydra"
)
overrides+=("$@")

read -r -a extra_srun_args <<< "$SRUN_ARGS"
srun_common=(--cpus-per-task="$CPUS_PER_TASK")
if [[ -n "$CONTAINER_IMAGE" ]]; then
    srun_common+=(
        --container-image="$CONTAINER_IMAGE"
        --container-mounts="$CONTAINER_MOUNTS"
        --container-workdir="$REPO_DIR"
    )
fi
srun_common+=("${extra_srun_args[@]}")

# One task: the resolved config (also fails fast on a bad override, before N processes
# start). Inside the container too, where the job's Python is.
config_cmd=(
    srun --nodes=1 --ntasks=1 "${srun_common[@]}"
    "$PYTHON" -m megatron_longalign.train "${overrides[@]}" --cfg job --resolve
)
# One task per GPU. --kill-on-bad-exit=0: a rank that exits with 75 after a preemption
# save must not get the others killed while they finish (e.g. closing wandb).
train_cmd=(
    srun --nodes="$NNODES" --ntasks-per-node="$GPUS_PER_NODE"
    --ntasks="$((NNODES * GPUS_PER_NODE))" --kill-on-bad-exit=0 --wait="$SRUN_WAIT"
    --output="$ATTEMPT_DIR/rank%t.log"
)
if [[ -n "$GPU_BIND" ]]; then train_cmd+=(--gpu-bind="$GPU_BIND"); fi
train_cmd+=(
    "${srun_common[@]}"
    bash "$REPO_DIR/slurm/srun_task.sh" "$PYTHON" -m megatron_longalign.train "${overrides[@]}"
)

echo "job $SLURM_JOB_ID ($JOB_NAME) attempt $RESTART_COUNT: $NNODES node(s) x $GPUS_PER_NODE" \
    "GPU(s), world size $((NNODES * GPUS_PER_NODE)), rendezvous $MASTER_ADDR:$MASTER_PORT"
echo "run dir $RUN_DIR, logs $ATTEMPT_DIR, wandb run id $WANDB_RUN_ID"
if [[ "$DRY_RUN" == 1 ]]; then
    printf 'config:'; printf ' %q' "${config_cmd[@]}"; echo
    printf 'train:'; printf ' %q' "${train_cmd[@]}"; echo
    exit 0
fi

cd "$REPO_DIR"
mkdir -p "$ATTEMPT_DIR" "$RUN_DIR"

# ---- signals -------------------------------------------------------------------------------
# SIGUSR1 (Slurm's advance warning, --signal=B:USR1@...) and SIGTERM to this shell both
# become SIGUSR1 to srun, which forwards it to every task. Never SIGTERM to srun: srun
# answers its own SIGTERM by SIGKILLing the tasks ("forcing job termination"), which would
# lose the step in progress and the save.
caught=""
interrupted=0
srun_pid=""
# shellcheck disable=SC2329  # invoked by the traps below
on_signal() {
    caught="$1"
    interrupted=1
    echo "caught SIG$1: asking the training to finish its step, save and stop"
    if [[ -n "$srun_pid" ]]; then
        kill -s USR1 "$srun_pid" 2>/dev/null || true
    fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

requeue() {
    if [[ "$REQUEUE" != 1 ]]; then
        echo "not requeued (REQUEUE=$REQUEUE); resubmit to continue from $RUN_DIR"
        return
    fi
    echo "requeueing job $SLURM_JOB_ID: the next attempt resumes from $RUN_DIR/checkpoints"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        echo "scontrol requeue failed: resubmit with the same -J (or RUN_DIR) to continue" >&2
    fi
}

config_status=0
"${config_cmd[@]}" > "$ATTEMPT_DIR/config.yaml" || config_status=$?
# Signalled before the training started, nothing to save: this shell (the trap), or the
# config task itself (e.g. `scancel --signal=USR1`), which then exits 75.
if [[ "$config_status" -eq "$PREEMPTED_EXIT_CODE" || ("$config_status" -eq 0 && -n "$caught") ]]; then
    echo "preempted before the training started: nothing to save"
    requeue
    exit "$PREEMPTED_EXIT_CODE"
fi
if [[ "$config_status" -ne 0 ]]; then  # e.g. 2: a configuration error; a retry would fail too
    echo "the config step failed with status $config_status: not requeued" >&2
    exit "$config_status"
fi

"${train_cmd[@]}" &
srun_pid=$!
# `wait` returns early (status > 128) when a trapped signal arrives, with srun still
# running: wait again (which also collects srun's status if it exited meanwhile).
while :; do
    interrupted=0
    status=0
    wait "$srun_pid" || status=$?
    if [[ "$status" -gt 128 && "$interrupted" == 1 ]]; then continue; fi
    break
done

if [[ "$status" -eq "$PREEMPTED_EXIT_CODE" ]]; then
    echo "the training saved a checkpoint and stopped (status $status)"
    requeue
elif [[ -n "$caught" ]]; then
    echo "a signal was caught but the training exited with status $status: not requeued"
fi
exit "$status"
