#!/usr/bin/env bash
# One device call (issue 16, large-M MoE, the Gluon warp-specialized grouped GEMM): its GPU tests (outputs vs
# the torch reference and the Triton TMA path at odd sizes, zero-row experts, graph replay), then the layer
# old path vs Triton TMA vs the default Gluon configs at M = 1024 / 4096 / 16384 in one process, with each
# GEMM alone and a small tile sweep. The cooperative configs (one MMA partition) and the ping-pong ones run
# apart, each under its own timeout, so that a hang in one (a wrong barrier phase waits forever) leaves the
# other's numbers. TEST_S / BENCH_S: each step's time limit (120 / 170 s: all four within a 600 s device call).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for sel in "not pp" "pp"; do
  echo "== GPU tests -k '$sel'"
  timeout ${TEST_S:-120} python3 -m pytest -q -m gpu tests/test_kernels_moe_gluon.py -k "$sel" 2>&1 | tail -6
done
for gl in gluon,gluon64 gluon_pp,gluon64_pp; do
  echo "== bench $gl"
  timeout ${BENCH_S:-170} python3 benchmarks/bench_moe_gluon.py --m 1024,4096,16384 --gluon "$gl" \
    --sweep --out "$OUT/$gl" 2>&1 | tee "$OUT/bench_$gl.log" \
    | grep -E "ceilings|moe_gluon|summary|Error|error"
done
