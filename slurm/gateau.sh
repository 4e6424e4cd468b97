#!/usr/bin/env bash
# GATEAU scoring on a Slurm allocation: one task per GPU, as training runs
# (slurm/srun_task.sh), then the merged scores file on rank 0 (docs/GATEAU.md).
#
#   PREFIX=data/long MODEL_A=ckpt/llama3_8b_8k MODEL_B=ckpt/llama3_8b_64k \
#   OUTPUT=gateau/long sbatch --nodes=2 slurm/gateau.sh [--tp 2 --cp 2 --seq-length 65536 ...]
#
# Extra arguments go to `tools/gateau.py score`. The run is resumable: requeue or resubmit
# the same command and finished samples are skipped (their scores are already in
# OUTPUT's shard files); a preemption just ends the job. Then select on one CPU:
#   python tools/gateau.py select --prefix data/long --scores gateau/long/scores.jsonl \
#       --output-prefix data/long_top10 --ratio 0.1
#SBATCH --job-name=gateau-score
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

: "${SLURM_JOB_ID:?run inside a Slurm job: sbatch slurm/gateau.sh [score options...]}"
: "${PREFIX:?set PREFIX to the preprocessed set to score (tools/preprocess.py output)}"
: "${MODEL_A:?set MODEL_A to the checkpoint of the short-window model}"
: "${MODEL_B:?set MODEL_B to the checkpoint of the long-window model}"
: "${OUTPUT:?set OUTPUT to the scores directory (created; reused to resume)}"
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
PYTHON="${PYTHON:-python}"
NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
CPUS_PER_TASK="${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-12}}"
LOG_DIR="${LOG_DIR:-$REPO_DIR/logs/gateau-$SLURM_JOB_ID}"
NCCL_ENV_FILE="${NCCL_ENV_FILE:-$REPO_DIR/slurm/nccl_env.sh}"
DRY_RUN="${DRY_RUN:-0}"  # 1: print the srun command instead of running it
if [[ -z "${MASTER_ADDR:-}" ]]; then
    hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
    MASTER_ADDR="${hosts%%$'\n'*}"
fi
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export MASTER_ADDR MASTER_PORT PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# shellcheck source=nccl_env.sh source-path=SCRIPTDIR
source "$NCCL_ENV_FILE"

score_cmd=(
    srun --nodes="$NNODES" --ntasks-per-node="$GPUS_PER_NODE"
    --ntasks="$((NNODES * GPUS_PER_NODE))" --cpus-per-task="$CPUS_PER_TASK"
    --output="$LOG_DIR/rank%t.log"
    bash "$REPO_DIR/slurm/srun_task.sh" "$PYTHON" "$REPO_DIR/tools/gateau.py" score
    --prefix "$PREFIX" --model-a "$MODEL_A" --model-b "$MODEL_B" --output "$OUTPUT" "$@"
)
echo "gateau job $SLURM_JOB_ID: $NNODES node(s) x $GPUS_PER_NODE GPU(s), scores in $OUTPUT"
if [[ "$DRY_RUN" == 1 ]]; then
    printf 'score:'; printf ' %q' "${score_cmd[@]}"; echo
    exit 0
fi
mkdir -p "$LOG_DIR"
cd "$REPO_DIR"
"${score_cmd[@]}"
