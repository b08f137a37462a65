#!/usr/bin/env bash
# One device call: GPU engine tests (graphs vs eager vs CPU reference), then the end-to-end benchmark.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
# the GPU image lacks a few packages: carry .wheelhouse (../shared/device/wheelhouse.sh) with the run
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
python3 -m pytest -q -m gpu tests/test_gpu_engine.py 2>&1 | tee $OUT/gpu_engine_tests.log | tail -30
if [ "${BENCH:-1}" = 1 ]; then
  # bf16 with transformers next to it and a kernel profile at B=1 and 64, then fp8
  python3 benchmarks/bench_e2e.py --out $OUT/e2e_bf16.json --profile 1,64 "$@" 2>&1 | tee $OUT/bench_e2e_bf16.log
  python3 benchmarks/bench_e2e.py --out $OUT/e2e_fp8.json --quantization fp8 --no-hf "$@" 2>&1 | tee $OUT/bench_e2e_fp8.log
fi
