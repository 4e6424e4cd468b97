#!/usr/bin/env bash
# Preprocess long chat JSONL into megatron-core IndexedDataset files on one CPU node.
#
#   INPUT='data/raw/long/*.jsonl' TOKENIZER=/models/Meta-Llama-3-8B TEMPLATE=llama3 \
#   OUTPUT_PREFIX=data/long sbatch slurm/preprocess.sh [extra tools/preprocess.py flags]
#
# Every variable below can be set in the environment; extra arguments are passed
# through to tools/preprocess.py (e.g. --skip-bad, or --overwrite to replace an existing
# OUTPUT_PREFIX.json set). It also runs without Slurm.
#SBATCH --job-name=longalign-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

: "${INPUT:?set INPUT to the JSONL files or globs (space-separated)}"
: "${TOKENIZER:?set TOKENIZER to a sentencepiece .model file or a local HF tokenizer directory}"
: "${TEMPLATE:?set TEMPLATE to one of llama2, llama3, chatml, chatglm, plain}"
: "${OUTPUT_PREFIX:?set OUTPUT_PREFIX, e.g. data/long (writes data/long.json and the files it names)}"
MAX_LENGTH="${MAX_LENGTH:-65536}"
ON_OVERLENGTH="${ON_OVERLENGTH:-drop}"
WORKERS="${WORKERS:-${SLURM_CPUS_PER_TASK:-$(nproc)}}"
PYTHON="${PYTHON:-python}"
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}"

read -r -a inputs <<< "$INPUT"
cd "$REPO_DIR"
echo "preprocess: ${#inputs[@]} input pattern(s), ${WORKERS} workers, template ${TEMPLATE}"
exec "$PYTHON" tools/preprocess.py \
    --input "${inputs[@]}" \
    --tokenizer "$TOKENIZER" \
    --template "$TEMPLATE" \
    --output-prefix "$OUTPUT_PREFIX" \
    --max-length "$MAX_LENGTH" \
    --on-overlength "$ON_OVERLENGTH" \
    --workers "$WORKERS" \
    "$@"
