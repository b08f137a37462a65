#!/usr/bin/env bash
# Session 8 (issue 16): the FP8 MoE GEMV retune with K steps of 1024-2048 for 1-byte weights (tune_moe_gemv.py), then
# the FP8 decode step at B=1 and 8 with the new table (one H200, ~3 minutes).
set -uo pipefail
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai setproctitle llguidance jsonschema 2>&1 | tail -1
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT/gemv
timeout 230 python3 benchmarks/tune_moe.py --gemv --shapes qwen3 --m 1,8 --dtypes fp8 --jobs 16 --out $OUT/gemv 2>&1 | grep -E "qwen3|summary" | tail -16
cp $OUT/gemv/configs/*.json kernels/configs/ && echo "table in use"
python3 - <<'PY'
import json
d = json.load(open("kernels/configs/moe_E128_H2048_I768_fp8_NVIDIA_H200.json"))
for m in ("1", "8"): print(m, d[m].get("gemv"))
PY
timeout 150 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1,8 --quantization fp8 --async-scheduling --steps 30 --out $OUT/e2e_fp8.json 2>&1 | grep -E "ours decode|SUMMARY"
