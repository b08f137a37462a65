#!/usr/bin/env bash
# One device call: what the landed code measures before this session's changes (issues 14, 15, 16, 21).
# Structured outputs on the GPU, coordinator overhead + dummy step, decode profile and mixed steps.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -c "import llguidance, importlib.metadata as m; print('llguidance', m.version('llguidance'))"
python3 -m pytest -q -m gpu tests/test_structured_output.py 2>&1 | tail -3
python3 benchmarks/bench_structured.py --batch-sizes 8,64,256 --out $OUT/structured.json 2>&1 | tail -8
python3 benchmarks/bench_coordinator.py --out $OUT/coord.json 2>&1 | tail -2
python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1,64 --profile 1,64 --mixed 256,1024,2048 \
  --out $OUT/e2e.json 2>&1 | grep -v '^\s*$' | tail -60
