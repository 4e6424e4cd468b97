#!/usr/bin/env bash
# Evaluation on a Slurm allocation (docs/EVALUATION.md): one task on one node, running
# tools/evaluate.py with the vllm backend by default (transformers or an OpenAI-compatible
# server with BACKEND=...).
#
#   TASK=needle MODEL=outputs/llama3_64k/hf OUTPUT=eval/needle \
#       sbatch slurm/evaluate.sh --haystack-dir data/haystack --max-context 64k
#   TASK=longbench-chat MODEL=ckpt/llama3_64k OUTPUT=eval/lbc sbatch slurm/evaluate.sh \
#       --data LongBench_Chat/test_cases.json --few-shots LongBench_Chat/few_shots.json \
#       --judge-base-url https://api.openai.com/v1 --judge-model gpt-4o
#   TASK=longbench MODEL=hf/ OUTPUT=eval/lb sbatch slurm/evaluate.sh --data-dir LongBench/data
#
# MODEL is an exported HF directory or a trainer checkpoint (exported on the fly). Extra
# arguments go to `tools/evaluate.py TASK`. Every task resumes: requeue or resubmit the
# same command and finished cases are skipped; judge replies are cached in OUTPUT.
#SBATCH --job-name=evaluate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

: "${SLURM_JOB_ID:?run inside a Slurm job: sbatch slurm/evaluate.sh [task options...]}"
: "${TASK:?set TASK to needle, longbench-chat or longbench}"
: "${MODEL:?set MODEL to an exported HF directory or a trainer checkpoint}"
: "${OUTPUT:?set OUTPUT to the results directory (created; reused to resume)}"
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
PYTHON="${PYTHON:-python}"
BACKEND="${BACKEND:-vllm}"
DRY_RUN="${DRY_RUN:-0}"  # 1: print the command instead of running it
export PYTHONUNBUFFERED=1

eval_cmd=(
    "$PYTHON" "$REPO_DIR/tools/evaluate.py" "$TASK"
    --backend "$BACKEND" --model "$MODEL" --output "$OUTPUT" "$@"
)
echo "evaluate job $SLURM_JOB_ID: $TASK of $MODEL ($BACKEND), results in $OUTPUT"
if [[ "$DRY_RUN" == 1 ]]; then
    printf 'evaluate:'; printf ' %q' "${eval_cmd[@]}"; echo
    exit 0
fi
cd "$REPO_DIR"
"${eval_cmd[@]}"
