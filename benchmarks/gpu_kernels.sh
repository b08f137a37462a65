#!/usr/bin/env bash
# Kernel checks and benchmarks on the GPU machine, run from the repo root through the device tool:
#   bash benchmarks/gpu_kernels.sh            # gpu tests, attention + MoE benchmarks
#   TUNE=1 bash benchmarks/gpu_kernels.sh     # also tune the MoE block shapes first (JSON under $OUT)
# Logs and JSON go to $OUT (benchmarks/out without the device tool); a short table is printed last.
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv \
  | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python -m pytest -m gpu -q -x tests/test_kernels_*.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
fi
if [ "${TUNE:-0}" = 1 ]; then
  python benchmarks/tune_moe.py --out "$OUT" ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune_moe.log" | grep -E "best|tune_moe"
  cp "$OUT"/configs/*.json kernels/configs/ 2>/dev/null || true
fi
if [ "${SKIP_ATTN:-0}" != 1 ]; then
  python benchmarks/bench_attention.py --out "$OUT" ${ATTN_ARGS:-} 2>&1 | tee "$OUT/bench_attention.log"
fi
python benchmarks/bench_moe.py --out "$OUT" ${MOE_ARGS:-} 2>&1 | tee "$OUT/bench_moe.log"
echo "==== summary"
tail -3 "$OUT/pytest_gpu.log" 2>/dev/null
grep -h "summary" "$OUT"/bench_*.log
