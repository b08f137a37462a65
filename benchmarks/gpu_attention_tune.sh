#!/usr/bin/env bash
# Attention kernels (issues 16 and 17) on one GPU, from the repo root through the device tool (~8 min):
#   bash benchmarks/gpu_attention_tune.sh
# 1. GPU attention tests: FP8 store, decode / extend vs the torch reference and FP8 vs bf16 KV at real shapes,
#    tiles of each pipelining depth vs the reference.
# 2. benchmarks/tune_attention.py (its own budget: --budget-s 150, plus ~30 s to start), every config timed from
#    CUDA-graph replays (decode over rotated page sets, no flush): every row, the best
#    config per case and per table key in $OUT/tune/tune_attention.json, the table in
#    $OUT/tune/configs/attention_<gpu>.json. The table is copied into kernels/configs/ of this run's checkout
#    for step 3; commit it from $OUT to keep it.
# 3. benchmarks/bench_attention.py with the tuned table: decode B=1 / 16 / 64 at 4k / 32k / 128k, bf16 and FP8
#    KV (CUDA-graph replay, SDPA beside), an 8k chunk over a 120k prefix (bf16 and FP8), causal prefill.
# Env knobs: SKIP_TESTS, TUNE_ARGS, ATTN_ARGS.
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/attention_tune.log") 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 180 python -m pytest -m gpu -q -s tests/test_kernels_attention.py tests/test_attention_configs.py 2>&1 \
    | grep -E "fp8 vs bf16|passed|failed|Error" | tail -12
fi
echo "tests done at ${SECONDS} s"
# the tuner's own budget (150 s of timing) keeps the whole run under the device tool's 10 minutes
timeout 270 python benchmarks/tune_attention.py --out "$OUT/tune" ${TUNE_ARGS:---budget-s 150}
echo "tuning done at ${SECONDS} s"
cp "$OUT"/tune/configs/attention_*.json kernels/configs/ 2>/dev/null && echo "tuned table in use: $(ls kernels/configs/attention_*.json)"
timeout 240 python benchmarks/bench_attention.py --out "$OUT/bench" --batches 1,16,64 --ctxs 4096,32768,131072 \
  --kv-dtypes bf16,fp8 --extend 8192:122880 ${ATTN_ARGS:-}
echo "==== summary (${SECONDS} s)"
grep -h "summary" "$OUT/attention_tune.log" | grep -v "^grep"
