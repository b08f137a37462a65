#!/usr/bin/env bash
# One device call (issue 16, fused router): its GPU tests, the router kernel benchmark (fused vs F.linear + top-k,
# with an H-split sweep to check _fused_config), then the decode steps B=1/8/64 that now run it. Fits one
# 600 s device call.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 120 python3 -m pytest -q -m gpu tests/test_kernels_router_fused.py tests/test_kernels_router.py 2>&1 | tail -4
timeout 330 python3 benchmarks/bench_router.py --out $OUT/router --m 1,8,32,64,128,256 --sweep 1,2,4,8,16,32 2>&1 | tail -30
timeout 140 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1,8,64 --async-scheduling --out $OUT/e2e_router.json 2>&1 | tail -8
