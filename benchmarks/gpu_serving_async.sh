#!/usr/bin/env bash
# One device call (issue 16, the host path): the served TPOT against the engine's own decode step, async scheduling
# on (now the default). bench_e2e times the step at the server's --max-model-len (its decode-attention split count
# follows it), once as the offline engine and once built as a served rank (expert statistics counted in the
# forward); then one server with default flags under bench_serving at concurrency 1 and 64 (1024 in / 128 out).
# SYNC=1 adds the same two loads on a second server with --no-async-scheduling. About 5 minutes (7 with SYNC=1).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
export TRITON_CACHE_DIR=$(mktemp -d)  # shared: the server starts with bench_e2e's kernels compiled
E2E="--no-hf --batch-sizes 1,64 --ctx 1024 --max-model-len 4096 --prefill 2048 --steps 40"
timeout 150 python3 benchmarks/bench_e2e.py $E2E --out $OUT/e2e.json 2>&1 | grep -E "ours decode|SUMMARY"
timeout 120 python3 benchmarks/bench_e2e.py $E2E --as-served --out $OUT/e2e_served.json 2>&1 | grep -E "ours decode"
MODEL=$(mktemp -d)
python3 -c "import json,sys; from benchmarks.bench_e2e import QWEN3_30B_A3B as c; json.dump(c, open(sys.argv[1]+'/config.json','w'))" $MODEL
BENCH="--port 8011 --input-len 1024 --output-len 128 --token-id-range 10 150000"

serve() {  # $1: tag, then extra server flags
  local tag=$1; shift
  setsid python3 -m runtime.serve --model $MODEL --load-format dummy --max-model-len 4096 --max-num-seqs 256 \
    --port 8011 --served-model-name q "$@" > $OUT/serve_$tag.log 2>&1 &
  local pid=$!
  for i in $(seq 1 150); do curl -sf localhost:8011/health | grep -q '"ok"' && break; sleep 1; done
  # a warm-up load compiles what start-up did not; each load has prompts of its own seed (no prefix-cache hits)
  python3 benchmarks/bench_serving.py $BENCH --num-prompts 4 --max-concurrency 1 --seed 1 \
    --result-file $OUT/warm_$tag.json > /dev/null 2>&1
  python3 benchmarks/bench_serving.py $BENCH --num-prompts 12 --max-concurrency 1 --seed 2 \
    --result-file $OUT/c1_$tag.json 2>&1 | grep "^bench_serving rate"
  python3 benchmarks/bench_serving.py $BENCH --num-prompts 192 --max-concurrency 64 --seed 3 \
    --result-file $OUT/c64_$tag.json 2>&1 | grep "^bench_serving rate"
  kill $pid; while kill -0 $pid 2>/dev/null; do sleep 0.5; done  # (processes retitle: no pkill -f)
}
serve async
[ "${SYNC:-0}" = 1 ] && serve sync --no-async-scheduling

python3 - $OUT <<'PY'
import json, os, sys
out = sys.argv[1]
def step(name):
    try:
        rows = json.load(open(f"{out}/{name}"))["rows"]
    except (OSError, ValueError, KeyError):
        return {}
    return {r["batch"]: r["step_ms"] for r in rows if r["engine"] == "ours" and r["phase"] == "decode"}
steps, served = step("e2e.json"), step("e2e_served.json")
for tag in ("async", "sync"):
    for c, b in ((1, 1), (64, 64)):
        path = f"{out}/c{c}_{tag}.json"
        if not os.path.exists(path):
            continue
        tpot = json.load(open(path))["runs"][0]["tpot_s"]["p50"] * 1e3
        ref, ref_served = steps.get(b, float("nan")), served.get(b, float("nan"))
        print(f"SUMMARY serving {tag} c={c}: TPOT p50 {tpot:.2f} ms; bench_e2e B={b} step {ref:.2f} ms "
              f"(TPOT {tpot / ref - 1:+.1%}), as served {ref_served:.2f} ms (TPOT {tpot / ref_served - 1:+.1%})")
PY
