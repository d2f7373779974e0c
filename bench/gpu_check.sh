#!/usr/bin/env bash
# The first minutes on a GPU: every CUDA test, then the benchmarks on the GPU at a real model's
# shape (Qwen3-0.6B's config, random weights, 2048 tokens), and one table of ratios against the
# original. Budget: under 8 minutes on one GPU.
#
#   bash bench/gpu_check.sh             # needs a CUDA device
#   bash bench/gpu_check.sh --dry-run   # only list what it would run
#
# JSON results go to $GPU_CHECK_OUT (default bench/results/gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${GPU_CHECK_OUT:-bench/results/gpu_check}"
SHAPE="--device cuda --shape qwen3-0.6b --seq 2048 --batch 1"
STEPS=(
  "python -m pytest -q -rs -m cuda tests/test_cuda.py tests/train/test_fsdp_precision.py"
  "python bench/layer.py --device cuda --widths 1024 2048 --batch 1 --seq 2048 --repeats 10 --out $OUT/layer.json"
  "python bench/train_step.py $SHAPE --streams 4 --repeats 5 --out $OUT/train_step.json"
  "python bench/train_step.py $SHAPE --streams 4 --repeats 5 --compile --out $OUT/train_step_compile.json"
  "python bench/decode.py --device cuda --shape qwen3-0.6b --repeats 5 --out $OUT/decode.json"
  "python bench/decode.py --device cuda --shape qwen3-0.6b --repeats 3 --compile --variants mhc --out $OUT/decode_compile.json"
  "python bench/summary.py $OUT"
)

if [[ "${1:-}" == "--dry-run" ]]; then
  printf '%s\n' "${STEPS[@]}"
  exit 0
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA device visible to torch; run this on a GPU machine (--dry-run lists the steps)" >&2
  exit 1
fi
mkdir -p "$OUT"
start=$SECONDS
for step in "${STEPS[@]}"; do
  echo "== $step"
  eval "$step"
done
echo "gpu_check: done in $((SECONDS - start)) s"
