#!/usr/bin/env bash
# One device call (issue 16, FP8 linears): GPU tests, the benchmark on the heuristic, the tuning sweep (~3.5 min),
# then the benchmark again on the tuned table (its rows also time the heuristic where the table differs).
# The timeouts add up to 570 s: one 600-s device call.
# The table comes back as $OUT/tune/configs/fp8_linear_<gpu>.json: commit it to kernels/configs/.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
rm -f kernels/configs/fp8_linear_*.json  # the first benchmark runs the heuristic
timeout 100 python3 -m pytest -q tests/test_kernels_fp8_linear.py tests/test_fp8_linear_model.py 2>&1 | tail -4
timeout 100 python3 benchmarks/bench_fp8_linear.py --out $OUT/heuristic --m 1,8,64,256,1024,4096 2>&1 \
  | tee $OUT/bench_heuristic.log | tail -3
timeout 220 python3 benchmarks/tune_fp8_linear.py --out $OUT/tune --budget-s 170 --jobs 14 > $OUT/tune.log 2>&1
grep -v "^    skip" $OUT/tune.log | tail -12
cp $OUT/tune/configs/fp8_linear_*.json kernels/configs/
timeout 150 python3 benchmarks/bench_fp8_linear.py --out $OUT/tuned --m 1,8,64,256,1024,4096 2>&1 \
  | tee $OUT/bench_tuned.log | tail -26
