#!/usr/bin/env bash
# One device call after the evening merges (issue 16): GPU tests of every kernel changed this session, the GEMV
# MoE tiles tuned at M = 1 and 8 (tables written where GEMV won), then the decode steps bf16 and FP8 with them.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -m gpu -x tests/test_kernels_fp8_linear.py tests/test_fp8_linear_model.py \
  tests/test_moe_gemv.py tests/test_kernels_attention.py tests/test_kernels_moe_tma.py 2>&1 | tail -4
timeout 130 python3 benchmarks/tune_moe.py --gemv --shapes qwen3 --m 1,8 --dtypes bf16,fp8 --out "$OUT/gemv" 2>&1 \
  | grep -E "gemv qwen3|summary" | tail -8
cp "$OUT"/gemv/configs/*.json kernels/configs/ 2>/dev/null && echo "gemv tables in use"
for q in "" "--quantization fp8"; do
  timeout 90 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1,64 --async-scheduling $q \
    --out "$OUT/e2e${q:+_fp8}.json" 2>&1 | grep -E "^ours decode|SUMMARY"
done
