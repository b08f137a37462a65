#!/usr/bin/env bash
# Session 8 (issue 16): the weight-only FP8 GEMV of the attention projections (kernels/linear/gemv.py) tuned against
# the W8A8 linear on one H200, its table put in use, the FP8 decode step at B=1/8, then its GPU tests (~7 minutes).
set -uo pipefail
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 230 python3 benchmarks/tune_linear_gemv.py --weights fp8 --shapes qwen3,glm45air --tp 1 --m 1,2,4,8,16 \
  --budget-s 170 --out-dir $OUT 2>&1 | grep -vE "^\s*$" | tail -16
cp $OUT/configs/linear_gemv_fp8_*.json kernels/configs/ && echo "FP8 GEMV table in use"
timeout 150 python3 benchmarks/bench_e2e.py --quantization fp8 --no-hf --batch-sizes 1,8 --async-scheduling --steps 30 \
  --out $OUT/e2e_fp8.json 2>&1 | grep -E "ours decode|SUMMARY"
timeout 150 python3 -m pytest -q -m gpu tests/test_linear_gemv_fp8.py tests/test_linear_gemv.py \
  tests/test_fp8_linear_model.py 2>&1 | tail -3
echo "done in $SECONDS s"
