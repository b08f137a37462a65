#!/usr/bin/env bash
# One device call for issue 16's small-batch decode: the dense GEMV linear and PDL (built without a GPU on
# 2026-11-29 and measured the same day: the GEMV table is committed, PDL is on by default on Hopper, so the
# baselines pass --no-pdl). Two lanes, in parallel on nvidia-h200-x2 (one per GPU), one after the other
# on a single GPU (then give LANES=a or LANES=b per call: each lane is ~8 minutes).
#   lane a (GPU 0, bf16): bench_e2e B=1,8,64 as today (the baseline); the GEMV tuner (its own cuBLAS baseline in
#     the same process; a table entry only where the GEMV wins by >= 3%, re-timed); bench_e2e with that table;
#     with the table and --pdl.
#   lane b (GPU 1): bench_e2e --quantization fp8 without and with --pdl; the GPU tests of the GEMV and PDL; the
#     existing kernel / engine GPU tests with MOE_RT_PDL=1 (every wrapper launching with PDL).
# Lane b runs from a copy of the tree made before lane a writes the GEMV table. Everything in $OUT/chain.tgz; the
# table (if any) also as $OUT/linear_gemv_table.json to commit into kernels/configs/.
set -uo pipefail
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; R=/tmp/chain; mkdir -p $OUT $R
LANES=${LANES:-ab}
NGPU=$(nvidia-smi -L | wc -l)
E2E="--no-hf --batch-sizes 1,8,64 --async-scheduling --steps 30"

lane_a() {
  export TRITON_CACHE_DIR=/tmp/triton_a
  timeout 100 python3 benchmarks/bench_e2e.py $E2E --no-pdl --out $R/e2e_bf16_base.json 2>&1 | grep -E "^ours decode|SUMMARY"
  timeout 170 python3 benchmarks/tune_linear_gemv.py --shapes qwen3 --tp 1 --m 1,2,4,8,16 --budget-s 130 \
    --out-dir $R/gemv 2>&1 | grep -E "M=|summary" | cut -c1-220
  cp $R/gemv/configs/linear_gemv_*.json kernels/configs/ 2>/dev/null && cp $R/gemv/configs/linear_gemv_*.json \
    $OUT/linear_gemv_table.json && echo "GEMV table in use: $(cat kernels/configs/linear_gemv_*.json | tr -d ' \n' | cut -c1-300)"
  timeout 100 python3 benchmarks/bench_e2e.py $E2E --no-pdl --out $R/e2e_bf16_gemv.json 2>&1 | grep -E "^ours decode|SUMMARY"
  timeout 100 python3 benchmarks/bench_e2e.py $E2E --pdl --out $R/e2e_bf16_gemv_pdl.json 2>&1 \
    | grep -E "^ours decode|SUMMARY"
}

lane_b() {
  cd /tmp/lane_b_tree
  export TRITON_CACHE_DIR=/tmp/triton_b
  timeout 100 python3 benchmarks/bench_e2e.py $E2E --quantization fp8 --no-pdl --out $R/e2e_fp8_base.json 2>&1 \
    | grep -E "^ours decode|SUMMARY"
  timeout 100 python3 benchmarks/bench_e2e.py $E2E --quantization fp8 --pdl --out $R/e2e_fp8_pdl.json 2>&1 \
    | grep -E "^ours decode|SUMMARY"
  timeout 120 python3 -m pytest -q -m gpu tests/test_linear_gemv.py tests/test_pdl.py 2>&1 | tail -3
  MOE_RT_PDL=1 timeout 150 python3 -m pytest -q -m gpu tests/test_moe_gemv.py tests/test_kernels_attention.py \
    tests/test_kernels_fp8_linear.py tests/test_gpu_engine.py 2>&1 | tail -3
}

rm -rf /tmp/lane_b_tree && cp -r . /tmp/lane_b_tree
if [ "$LANES" = ab ] && [ "$NGPU" -ge 2 ]; then
  (CUDA_VISIBLE_DEVICES=0 lane_a > $R/lane_a.log 2>&1) &
  (CUDA_VISIBLE_DEVICES=1 lane_b > $R/lane_b.log 2>&1) &
  wait
  echo "=== lane a"; cat $R/lane_a.log; echo "=== lane b"; cat $R/lane_b.log
else
  case $LANES in *a*) lane_a 2>&1 | tee $R/lane_a.log ;; esac
  case $LANES in *b*) lane_b 2>&1 | tee $R/lane_b.log ;; esac
fi
pkill -9 -f "[m]oe-rt" 2>/dev/null
tar czf $OUT/chain.tgz -C /tmp chain 2>/dev/null
echo "done in $SECONDS s"
