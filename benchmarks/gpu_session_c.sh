#!/usr/bin/env bash
# One device call after the session's merges: every GPU test, then decode/mixed step times sync vs
# --async-scheduling (issue 16), and a mixed step eager vs replayed from its bucket's graph (issues 15, 21).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 240 python3 -m pytest -q -m gpu tests/ 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -15
for mode in "--no-async-scheduling" "--async-scheduling"; do  # (async is the default now)
  timeout 150 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1,64 --mixed 1024 $mode \
    --out $OUT/e2e_${mode#--}.json 2>&1 | grep -E "ours decode|mixed|SUMMARY"
done
timeout 120 python3 benchmarks/profile_step.py --batch 64 --prompt-len 1024 --out-dir $OUT/prof 2>&1 | grep -E "^== |profile_step:"
