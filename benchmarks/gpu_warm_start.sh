#!/usr/bin/env bash
# One device call (issue 21): a server at Qwen3-30B-A3B shapes (dummy weights) started cold (empty Triton
# cache), three identical bench_serving runs back to back and a Poisson run; compiled kernels counted in the
# cache after start-up and after each run; then a restart on the warm cache (start-up time to first token),
# and the same load at other --max-num-batched-tokens values for the latency / throughput trade-off.
# Usage: bash benchmarks/gpu_warm_start.sh [MNBT ...]   (default: 8192 2048)
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai 2>&1 | tail -1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
export TRITON_CACHE_DIR=$(mktemp -d)
MODEL=$(mktemp -d)
python3 -c "import json,sys; from benchmarks.bench_e2e import QWEN3_30B_A3B as c; json.dump(c, open(sys.argv[1]+'/config.json','w'))" $MODEL
BENCH="--port 8011 --input-len 1024 --output-len 128 --token-id-range 10 150000"
kernels() { find $TRITON_CACHE_DIR -name '__grp__*.json' | wc -l; }
now() { python3 -c 'import time; print(f"{time.time():.2f}")'; }
since() { python3 -c "print(f'{$(now) - $1:.1f}')"; }

start() {  # start MNBT LOG: waits for /health ok, prints seconds to ready and to the first token
  local t0=$(now)
  setsid python3 -m runtime.serve --model $MODEL --load-format dummy --max-model-len 4096 --max-num-seqs 256 \
    --max-num-batched-tokens $1 --port 8011 --served-model-name q > $2 2>&1 &
  SERVE_PID=$!
  for i in $(seq 1 200); do curl -sf localhost:8011/health | grep -q '"ok"' && break; sleep 1; done
  local ready=$(since $t0)
  curl -s localhost:8011/v1/completions -H 'Content-Type: application/json' \
    -d '{"model":"q","prompt":[11,12,13],"max_tokens":1}' > /dev/null
  echo "START mnbt=$1 ready_s=$ready first_token_s=$(since $t0) kernels=$(kernels)"
}
# the processes retitle themselves (moe-rt: launcher, ...): signal the launcher by pid, it takes the rest down
stop() { kill $SERVE_PID; while kill -0 $SERVE_PID 2>/dev/null; do sleep 0.5; done; }

start 8192 $OUT/serve_cold.log
for r in 1 2 3; do
  python3 benchmarks/bench_serving.py $BENCH --num-prompts 192 --max-concurrency 64 \
    --result-file $OUT/warm_run$r.json 2>&1 | grep "^bench_serving rate"
  echo "after run $r: kernels=$(kernels)"
done
python3 benchmarks/bench_serving.py $BENCH --num-prompts 192 --request-rate 20 \
  --result-file $OUT/warm_poisson.json 2>&1 | grep "^bench_serving rate"
echo "after poisson: kernels=$(kernels)"
echo "silent warnings: $(grep -c silent $OUT/serve_cold.log)"
stop
for m in "${@:-8192 2048}"; do
  start $m $OUT/serve_$m.log   # warm cache: the restart case
  python3 benchmarks/bench_serving.py $BENCH --num-prompts 192 --max-concurrency 64 \
    --result-file $OUT/mnbt${m}_c64.json 2>&1 | grep "^bench_serving rate"
  python3 benchmarks/bench_serving.py $BENCH --num-prompts 192 --request-rate 20 \
    --result-file $OUT/mnbt${m}_poisson.json 2>&1 | grep "^bench_serving rate"
  echo "silent warnings: $(grep -c silent $OUT/serve_$m.log)"
  stop
done
grep -h "warmed up\|captured" $OUT/serve_cold.log | head -3
