#!/usr/bin/env bash
# GPU verification in one run (issues 12 and 16), for a lent single-GPU machine that has
# torch with CUDA but no network and no megatron-core. Prepared and smoke-tested on the
# CPU machine (`GPU_CHECK_CPU=1 bash bench/gpu_check.sh`); on the GPU every step runs
# under its own time limit, so one slow or failing step cannot cost the others, and each
# step's results land in $OUT as soon as it ends.
#
#   1. the CUDA-only unit tests (flex forward/backward vs sdpa per document);
#   2. flex vs sdpa through the whole model in bf16: loss and all gradients against an
#      fp32 reference, packed documents, SkipAlign positions, GQA (bench/gpu_backend_check.py);
#   3. output layer + loss, standard vs chunked, T = 64k, V = 128k, bf16
#      (bench/loss_memory_bench.py): peak memory and time;
#   4. a ~1B Llama (TinyLlama-1.1B's shape) trained in bf16 with flex at 8k/16k/32k/64k
#      packed tokens: tokens/s, TFLOP/s, MFU, peak memory vs tools/plan.py's estimate,
#      and forward-only scoring throughput (bench/train_throughput.py);
#   5. naive vs sorted vs packed batching on the same data, one epoch each (same script).
#
# Wheels: megatron-core (cp312), hydra-core, omegaconf and antlr4 in .whl/ (see
# docs/PERFORMANCE.md "GPU check" for the pip download line), installed into /tmp/site.
#
#   bash bench/gpu_check.sh                      # results in $OUT (default ./gpu_check_out)
#   GPU_CHECK_BUDGET_S=420 bash bench/gpu_check.sh
#   GPU_CHECK_STEPS="loss throughput" bash bench/gpu_check.sh   # a subset, e.g. a rerun
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET_S:-480}
STEPS=${GPU_CHECK_STEPS:-"tests backends loss throughput batching"}
CPU=${GPU_CHECK_CPU:-0}
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

PY=${PYTHON:-python3}
if [[ -d .whl ]] && ! $PY -c "import megatron.core" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'megatron-core', m.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} | tee "$OUT/env.txt"

# left: seconds left of the budget, at most $1
left() { local l=$((BUDGET - (SECONDS - START))); ((l > $1)) && l=$1; echo $l; }
declare -A STATUS
run_step() {  # name, max seconds, command...
  local name=$1 cap=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  local limit; limit=$(left "$cap")
  if ((limit < 20)); then STATUS[$name]="not run (budget spent)"; return 0; fi
  echo "=== $name (limit ${limit}s, t=$((SECONDS - START))s) ==="
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  STATUS[$name]="rc=$rc in $((SECONDS - t0))s"
  echo "=== $name: ${STATUS[$name]} ==="
}

if [[ $CPU == 1 ]]; then  # the CPU smoke run of the same steps, tiny sizes
  run_step tests 120 $PY -m pytest -q -p no:cacheprovider tests/model/test_attention.py -k gpu
  run_step backends 120 $PY bench/gpu_backend_check.py --device cpu --tokens 600 \
    --backends sdpa --output-json "$OUT/backend_check.json"
  run_step loss 200 $PY bench/loss_memory_bench.py --quick --no-recompute \
    --output-json "$OUT/loss_memory.json"
  run_step throughput 120 $PY bench/train_throughput.py --device-profile cpu-smoke \
    --seq-lengths 256 --backends sdpa --steps 2 --warmup 1 --skip-batching \
    --output-json "$OUT/throughput.json"
  run_step batching 120 $PY bench/train_throughput.py --device-profile cpu-smoke \
    --seq-lengths "" --ab-samples 48 --output-json "$OUT/batching.json"
else
  run_step tests 90 $PY -m pytest -q -p no:cacheprovider tests/model/test_attention.py -k gpu
  run_step backends 90 $PY bench/gpu_backend_check.py --device cuda --tokens 8192 \
    --backends flex,sdpa --output-json "$OUT/backend_check.json"
  run_step loss 120 $PY bench/loss_memory_bench.py --device cuda --dtype bf16 \
    --tokens 65536 --vocabs 128256 --hiddens 2048,4096 --repeats 2 --no-recompute \
    --output-json "$OUT/loss_memory.json"
  run_step throughput 200 $PY bench/train_throughput.py --device-profile gpu \
    --backends flex --seq-lengths 8192,16384,32768,65536 --steps 3 --warmup 2 \
    --scoring-steps 2 --skip-batching --output-json "$OUT/throughput.json"
  run_step batching 120 $PY bench/train_throughput.py --device-profile gpu \
    --seq-lengths "" --ab-samples 64 --warmup 1 --output-json "$OUT/batching.json"
fi

echo
echo "gpu_check summary ($((SECONDS - START))s of ${BUDGET}s):"
for name in $STEPS; do echo "  $name: ${STATUS[$name]:-skipped}"; done
