#!/usr/bin/env bash
# One device call (issue 16, large-M MoE, the Gluon warp-specialized grouped GEMM): its GPU tests (outputs vs
# the torch reference and the Triton TMA path at odd sizes, zero-row experts, graph replay), then the layer
# old path vs Triton TMA vs the four default Gluon configs at M = 1024 / 4096 / 16384 in one process, with
# each GEMM alone and a small tile sweep. TEST_S / BENCH_S: the two steps' time limits (180 / 300 s).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout ${TEST_S:-180} python3 -m pytest -q -x -m gpu tests/test_kernels_moe_gluon.py 2>&1 | tail -6
timeout ${BENCH_S:-300} python3 benchmarks/bench_moe_gluon.py --m 1024,4096,16384 --sweep --out "$OUT" 2>&1 \
  | tee "$OUT/bench_moe_gluon.log" | grep -E "ceilings|moe_gluon|summary|Error|error"
