#!/usr/bin/env bash
# Serving scaling on the GPUs of one host (issue 18), one device call on nvidia-h200-x2 (or larger):
#   CONFIGS="gpu1 dp2 dp2ep" bash benchmarks/gpu_multi_serving.sh      (then CONFIGS="tp2 ...")
# Qwen3-30B-A3B shapes, dummy weights, bf16, CUDA graphs, NCCL. For each config one server
# (`python -m runtime.serve`), an nvidia-smi snapshot after it is up and idle (which processes hold GPU memory,
# utilization), a warm-up load, then bench_serving at 1024 in / 128 out, CONC (256) concurrent, 2 x CONC prompts
# (CONC=512: each of two DP ranks as full as one GPU at 256, --max-num-seqs 256 per rank). KILL=1 also
# runs benchmarks/kill_rank_streams.py on the dp2ep server (kill -9 of DP rank 1 mid-stream). Configs: gpu1 (GPU 0
# alone), dp2, dp2ep, dp2ep_static (dp2ep whose prefills too take the fixed-size exchange: no host sync a MoE layer,
# up to 8192 tokens), tp2, dp2tp2ep (4 GPUs), dp4ep (4 GPUs). STATS=1: every server eager (--enforce-eager: the
# split is timed by module hooks, which a graph replay does not run) with --expert-stats-file, whose per-rank
# time_split is attention / MoE compute / all2all / other per step. Everything in $OUT/serving.tgz.
set -uo pipefail
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; R=/tmp/serving; mkdir -p $OUT $R
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
MODEL=$(mktemp -d)
python3 -c "import json,sys; from benchmarks.bench_e2e import QWEN3_30B_A3B as c; json.dump(c, open(sys.argv[1]+'/config.json','w'))" $MODEL
BENCH="--port 8011 --input-len 1024 --output-len 128 --token-id-range 10 150000"
START_S=${START_S:-240}
CONC=${CONC:-256}

serve() {  # $1: tag, then server flags
  local tag=$1; shift
  local t0=$SECONDS
  [ "${STATS:-0}" = 1 ] && set -- "$@" --enforce-eager --expert-stats-file $R/stats_$tag.json
  setsid python3 -m runtime.serve --model $MODEL --load-format dummy --max-model-len 4096 --max-num-seqs 256 \
    --port 8011 --served-model-name q "$@" > $R/serve_$tag.log 2>&1 &
  local pid=$!
  local up=0
  for i in $(seq 1 $START_S); do
    curl -sf localhost:8011/health 2>/dev/null | grep -q '"ok"' && { up=1; break; }
    kill -0 $pid 2>/dev/null || break
    sleep 1
  done
  if [ $up = 0 ]; then
    echo "SUMMARY $tag: not serving after $((SECONDS - t0)) s"; tail -30 $R/serve_$tag.log
    kill -9 -- -$pid 2>/dev/null; pkill -9 -f "[m]oe-rt"; sleep 2; return
  fi
  echo "$tag: up in $((SECONDS - t0)) s"
  sleep 5
  { nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv
    ps -eo pid,args | grep "[m]oe-rt"; } > $R/smi_$tag.txt 2>&1
  python3 benchmarks/bench_serving.py $BENCH --num-prompts 32 --max-concurrency 32 --seed 1 \
    --result-file $R/warm_$tag.json > /dev/null 2>&1
  python3 benchmarks/bench_serving.py $BENCH --num-prompts $((2 * CONC)) --max-concurrency $CONC --seed 3 \
    --result-file $R/tput_${tag}_c$CONC.json 2>&1 | grep "^bench_serving rate" | sed "s/^/SUMMARY $tag: /"
  if [ "$tag" = dp2ep ] && [ "${KILL:-0}" = 1 ]; then
    timeout 200 python3 benchmarks/kill_rank_streams.py --port 8011 --rank 1 --timeout 150 --out $R/kill_$tag.json 2>&1 \
      | sed -u "s/^/SUMMARY $tag: /"
  fi
  kill -TERM $pid; for i in $(seq 1 30); do kill -0 $pid 2>/dev/null || break; sleep 0.5; done
  pkill -9 -f "[m]oe-rt"; sleep 1
  echo "$tag: done at ${SECONDS} s"
}

for c in ${CONFIGS:-gpu1 dp2 dp2ep tp2}; do
  case $c in
    gpu1) CUDA_VISIBLE_DEVICES=0 serve gpu1 ;;
    dp2) serve dp2 -dp 2 ;;
    dp2ep) serve dp2ep -dp 2 --enable-expert-parallel ;;
    dp2ep_static) serve dp2ep_static -dp 2 --enable-expert-parallel --all2all-static-max-tokens 8192 ;;
    tp2) serve tp2 -tp 2 ;;
    dp2tp2ep) serve dp2tp2ep -dp 2 -tp 2 --enable-expert-parallel ;;
    dp4ep) serve dp4ep -dp 4 --enable-expert-parallel ;;
  esac
done
tar czf $OUT/serving.tgz -C /tmp serving
cat $R/smi_*.txt
