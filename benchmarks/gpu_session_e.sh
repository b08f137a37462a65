#!/usr/bin/env bash
# One device call (issue 16): the FP8 block-scaled linears' GPU tests and kernel benchmark, then the issue's
# decode table (B=1/8/64/256 bf16, B=1/64 fp8), synchronous and with --async-scheduling.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
pkill -9 -f "[m]oe-rt" 2>/dev/null
timeout 150 python3 -m pytest -q tests/test_kernels_fp8_linear.py tests/test_fp8_linear_model.py 2>&1 | tail -4
timeout 120 python3 benchmarks/bench_fp8_linear.py --out $OUT/fp8_linear 2>&1 | tail -25
timeout 150 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1,64 --quantization fp8 --no-async-scheduling --out $OUT/e2e_fp8.json 2>&1 | tail -8
timeout 150 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1,64 --quantization fp8 --async-scheduling --out $OUT/e2e_fp8_async.json 2>&1 | tail -8
timeout 120 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1,8,64,256 --async-scheduling --out $OUT/e2e_bf16_async.json 2>&1 | tail -10
