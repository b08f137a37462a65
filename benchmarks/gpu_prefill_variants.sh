#!/usr/bin/env bash
# Prefill / extend attention variants (issues 16 and 17) on one GPU, from the repo root through the device tool
# (~4 min):   bash benchmarks/gpu_prefill_variants.sh
# 1. benchmarks/tune_attention.py --only extend,prefill: the tiles, then the variant keys MASK_FREE / LPT_GRID /
#    RAGGED (bf16) / Q_F16 (FP8) on the table's tiles, every config vs the fp32 reference and SDPA beside; the
#    table (decode entries kept from kernels/configs/) in $OUT/tune/configs/, copied into this run's
#    kernels/configs/ for step 2 (commit it from $OUT to keep it). RAGGED rows are timed but enter the table only
#    with TUNE_ARGS="--pick-ragged" (the model passes no K/V to the kernel yet).
# 2. benchmarks/bench_attention.py with that table: causal prefill 1k / 4k / 8k / 4 x 2k / 16k with SDPA beside,
#    an 8k chunk over a 120k prefix (bf16 and FP8 KV), each also with the chunk's K/V passed (--ragged).
# 3. the GPU correctness tests of the prefill kernels (Triton's cache is warm from step 1).
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/prefill_variants.log") 2>&1
timeout 150 python benchmarks/tune_attention.py --out "$OUT/tune" --only extend,prefill --jobs 16 \
  ${TUNE_ARGS:---budget-s 100}
echo "tuning done at ${SECONDS} s"
cp "$OUT"/tune/configs/attention_*.json kernels/configs/ && echo "tuned table in use: $(ls kernels/configs/attention_*.json)"
timeout 110 python benchmarks/bench_attention.py --out "$OUT/bench" --batches 1 --ctxs 1024 --kv-dtypes bf16,fp8 \
  --extend 8192:122880 --ragged
echo "bench done at ${SECONDS} s"
timeout 150 python -m pytest -m gpu -q tests/test_prefill_variants.py tests/test_kernels_attention.py \
  tests/test_mixed_graphs.py -k "prefill or variants or tile or fp8_kv_attention" 2>&1 | tail -5
echo "==== summary (${SECONDS} s)"
grep -h "summary" "$OUT/prefill_variants.log" | grep -v "^grep"
