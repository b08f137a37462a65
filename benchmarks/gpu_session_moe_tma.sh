#!/usr/bin/env bash
# One device call (issue 16, large-M MoE): the TMA path's GPU tests, then old vs TMA side by side at
# M = 1024 / 4096 / 16384 (tune_moe --tma: per-GEMM candidates, the layer, the permute vs its floor; writes
# this GPU's table with "tma" entries where the new path won), then bench_moe --tma with that table in place
# (fused_experts' dispatch end to end, old and new columns). DTYPES=fp8 (or bf16,fp8) for FP8 experts;
# TEST_S / TUNE_S / BENCH_S: the three steps' time limits (120 / 330 / 120 s).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DTYPES=${DTYPES:-bf16}
timeout ${TEST_S:-120} python3 -m pytest -q -m gpu tests/test_kernels_moe_tma.py 2>&1 | tail -4
# every candidate compiled first in 14 processes (on a cold cache the timing pass used to compile them one by one:
# the first two H200 runs wrote nothing within 170-200 s); the per-BLOCK_M lines show progress
timeout ${TUNE_S:-330} python3 benchmarks/tune_moe.py --tma --jobs 14 --shapes qwen3 --dtypes "$DTYPES" \
  --m 1024,4096,16384 --out "$OUT" 2>&1 | tee "$OUT/tune_tma.log"
cp "$OUT"/configs/*.json kernels/configs/ 2>/dev/null || true
timeout ${BENCH_S:-120} python3 benchmarks/bench_moe.py --shapes qwen3 --dtypes "$DTYPES" --m 256,1024,4096,16384 --tma --no-ref \
  --out "$OUT" 2>&1 | tail -6
