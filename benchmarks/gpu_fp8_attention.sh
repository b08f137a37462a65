#!/usr/bin/env bash
# Session 8 (issue 17), one H200, ~5 minutes: the FP8 tensor-core attention variants (prefill FP8_DOT, decode
# fp8_dot 1/2/3; the H200 table's decode runs 2: kv fp8) next to the FP8-widening kernels (kv fp8widen) at B=1
# 32k/128k and extend 8k over 120k, then the GPU tests of this session's fused top-k sum + RMSNorm and of the FP8
# variants.
set -uo pipefail
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 170 python3 benchmarks/bench_attention.py --out $OUT/bench --batches 1 --ctxs 32768,131072 \
  --kv-dtypes fp8widen,fp8,fp8dot,fp8dot3 --extend 8192:122880 --no-prefill 2>&1 | grep -E "^attn|summary" | cut -c1-200
timeout 130 python3 -m pytest -q -m gpu -x tests/test_moe_sum_norm.py tests/test_attention_fp8_dot.py 2>&1 | tail -3
echo "done in $SECONDS s"
