#!/usr/bin/env bash
# One device call: GPU engine tests, end-to-end decode after the host-path change, the coordinator
# overhead with the front end in its own process, and the serving benchmark against a real server.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai 2>&1 | tail -1
if [ "${ONLY_SERVING:-0}" != 1 ]; then
python3 -m pytest -q -m gpu tests/test_gpu_engine.py 2>&1 | tee $OUT/gpu_engine_tests.log | tail -3
python3 benchmarks/bench_e2e.py --no-hf --out $OUT/e2e_bf16.json 2>&1 | tee $OUT/bench_e2e_bf16.log | grep -E "ours|SUMMARY|skip"
python3 benchmarks/bench_coordinator.py --out $OUT/coord.json 2>&1 | tail -8
fi
# serving: Qwen3-30B-A3B shapes, dummy weights, one GPU
MODEL=$(mktemp -d)
python3 -c "import json,sys; from benchmarks.bench_e2e import QWEN3_30B_A3B as c; json.dump(c, open(sys.argv[1]+'/config.json','w'))" $MODEL
setsid python3 -m runtime.serve --model $MODEL --load-format dummy --max-model-len 4096 --max-num-seqs 256 \
  --port 8011 --served-model-name qwen3-30b-a3b-dummy > $OUT/serve.log 2>&1 &
SERVE_PID=$!
for i in $(seq 1 150); do curl -sf localhost:8011/health | grep -q '"ok"' && break; sleep 2; done
curl -s localhost:8011/health; echo
for c in 16 64 256; do
  python3 benchmarks/bench_serving.py --port 8011 --num-prompts $((c * 3)) --input-len 512 --output-len 128 \
    --request-rate inf --max-concurrency $c --token-id-range 10 150000 --result-file $OUT/serving_c$c.json 2>&1 | tail -4
done
curl -s localhost:8011/metrics | grep -vE "^#" | grep -E "kv|generation_tokens|restart" | head -8
kill $SERVE_PID; while kill -0 $SERVE_PID 2>/dev/null; do sleep 0.5; done  # (processes retitle: no pkill -f)
tail -5 $OUT/serve.log
