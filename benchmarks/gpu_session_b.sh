#!/usr/bin/env bash
# One device call: structured outputs after the parallel grammar advance (issue 14), the collectives-only dummy
# step (issue 15), the fixed-capacity sparse all2all (issue 19), decode-time projections (issue 16).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pytest -q -m gpu tests/test_structured_output.py tests/test_dummy_step.py tests/test_gpu_all2all.py 2>&1 | tail -3
python3 benchmarks/bench_skinny.py --out $OUT/skinny.json 2>&1 | tail -18
python3 benchmarks/bench_structured.py --batch-sizes 64,256 --out $OUT/structured.json 2>&1 | grep SUMMARY
python3 benchmarks/bench_coordinator.py --out $OUT/coord.json 2>&1 | tail -1
python3 benchmarks/bench_all2all.py --backends allgather,sparse,sparse_cap --capacity-factor 1.0 \
  --out $OUT/all2all_cap.json 2>&1 | tail -12
