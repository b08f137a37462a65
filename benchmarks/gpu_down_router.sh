#!/usr/bin/env bash
# One device call (issue 16, B=1 decode): the MoE GEMV down_topk variant and the fused router's tail variants.
# GPU tests of both, then the GEMV tuner at M = 1,2,4,8 (bf16 and FP8; the gate_up tile kept from the table, the
# down GEMM timed per pair and as down_topk; tables written where GEMV wins), then the router tails at 1..64 rows.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 240 python3 -m pytest -q -m gpu -x tests/test_moe_gemv.py tests/test_kernels_router_fused.py \
  tests/test_kernels_router.py 2>&1 | tail -4
timeout 170 python3 benchmarks/tune_moe.py --gemv --gemv-keep-up --shapes qwen3 --m 1,2,4,8 --dtypes bf16,fp8 \
  --jobs 16 --out "$OUT/gemv" 2>&1 | grep -E "qwen3|summary" | tail -24
timeout 110 python3 benchmarks/bench_router.py --out "$OUT/router" --shapes qwen3 --m 1,2,4,8,16,64 \
  --tails 4,4p,2p,1,1p 2>&1 | tail -8
