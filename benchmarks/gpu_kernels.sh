#!/usr/bin/env bash
# Kernel checks and benchmarks on the GPU machine, run from the repo root through the device tool:
#   bash benchmarks/gpu_kernels.sh                       # gpu tests, attention + MoE benchmarks
#   TUNE=1 SKIP_BENCH=1 bash benchmarks/gpu_kernels.sh   # gpu tests + MoE tuning ($OUT/configs/*.json)
# Env knobs: SKIP_TESTS, SKIP_ATTN, SKIP_BENCH, TUNE, TUNE_ARGS, ATTN_ARGS, MOE_ARGS.
# Everything printed goes to $OUT/run.log (benchmarks/out without the device tool); JSON and PNG files land
# beside it; a short summary is printed last.
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python -m pytest -m gpu -q tests/test_kernels_*.py 2>&1 | tail -30 | tee "$OUT/.pytest_tail"
fi
if [ "${TUNE:-0}" = 1 ]; then
  timeout ${TUNE_TIMEOUT:-480} python benchmarks/tune_moe.py --out "$OUT" ${TUNE_ARGS:-}
  cp "$OUT"/configs/*.json kernels/configs/ 2>/dev/null || true
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  [ "${SKIP_ATTN:-0}" != 1 ] && python benchmarks/bench_attention.py --out "$OUT" ${ATTN_ARGS:-}
  python benchmarks/bench_moe.py --out "$OUT" ${MOE_ARGS:-}
fi
echo "==== summary"
tail -2 "$OUT/.pytest_tail" 2>/dev/null
grep -h "summary" "$OUT/run.log" | grep -v "^grep"
rm -f "$OUT/.pytest_tail"
