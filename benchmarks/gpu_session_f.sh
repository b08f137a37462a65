#!/usr/bin/env bash
# One device call (issue 16): the large-M TMA MoE path (GPU tests; old vs TMA at M = 1024 / 4096 / 16384, writing
# this GPU's table with "tma" entries where it won) and the fused router (GPU tests; bench vs F.linear + top-k).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 200 python3 -m pytest -q -m gpu tests/test_kernels_moe_tma.py tests/test_kernels_router_fused.py \
  tests/test_kernels_router.py 2>&1 | tail -4
timeout 200 python3 benchmarks/tune_moe.py --tma --shapes qwen3 --dtypes bf16 --m 1024,4096,16384 --out "$OUT/moe" \
  2>&1 | grep -v "^  "
timeout 120 python3 benchmarks/bench_router.py --out $OUT/router --m 1,8,32,64,128,256 --sweep 4,16 2>&1 | tail -16
