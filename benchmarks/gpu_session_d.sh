#!/usr/bin/env bash
# One device call: the structured-output GPU test bisected (mixed graphs on/off, eager), the async GPU test,
# then one server (defaults, cold Triton cache) under 64 concurrent streams and under Poisson arrivals (issue 21).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
if [ -f scratch_structured_gpu.py ]; then
  for kw in "{}" "dict(max_mixed_cudagraph_tokens=0)" "dict(enforce_eager=True)"; do
    CUDA_LAUNCH_BLOCKING=1 timeout 90 python3 scratch_structured_gpu.py "$kw" 2>&1 | grep -v Warning | tail -8
  done
fi
timeout 120 python3 -m pytest -q -m gpu tests/test_async_scheduling.py 2>&1 | grep -E "passed|failed|Error" | tail -4
export TRITON_CACHE_DIR=$(mktemp -d)
MODEL=$(mktemp -d)
python3 -c "import json,sys; from benchmarks.bench_e2e import QWEN3_30B_A3B as c; json.dump(c, open(sys.argv[1]+'/config.json','w'))" $MODEL
BENCH="--port 8011 --input-len 1024 --output-len 128 --token-id-range 10 150000"
t0=$(date +%s.%N)
setsid python3 -m runtime.serve --model $MODEL --load-format dummy --max-model-len 4096 --max-num-seqs 256 \
  --port 8011 --served-model-name q ${SERVE_ARGS:-} > $OUT/serve.log 2>&1 &
SERVE_PID=$!
for i in $(seq 1 200); do curl -sf localhost:8011/health | grep -q '"ok"' && break; sleep 1; done
echo "ready after $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
python3 benchmarks/bench_serving.py $BENCH --num-prompts 192 --max-concurrency 64 --result-file $OUT/c64.json 2>&1 \
  | grep "^bench_serving rate"
# the same prompts as the c=64 run (prefix-cache hits, as the earlier table measured) and then fresh ones
python3 benchmarks/bench_serving.py $BENCH --num-prompts 192 --request-rate 20 --result-file $OUT/poisson.json \
  2>&1 | grep "^bench_serving rate"
python3 benchmarks/bench_serving.py $BENCH --num-prompts 192 --request-rate 20 --seed 7 --result-file $OUT/poisson_fresh.json \
  2>&1 | grep "^bench_serving rate"
grep -h "captured\|warmed up\|silent" $OUT/serve.log | head -5
kill $SERVE_PID; while kill -0 $SERVE_PID 2>/dev/null; do sleep 0.5; done  # (processes retitle: no pkill -f)
