#!/usr/bin/env bash
# One device call (issue 16, large-M MoE, the Gluon warp-specialized grouped GEMM): its GPU tests (outputs vs
# the torch reference and the Triton TMA path at odd sizes, zero-row experts, graph replay), then the layer
# old path vs Triton TMA vs the default Gluon configs at M = 1024 / 4096 / 16384 in one process, with each
# GEMM alone and a small tile sweep. The cooperative configs (one MMA partition) and the ping-pong ones run
# apart, each under its own timeout, so that a hang in one (a wrong barrier phase waits forever) leaves the
# other's numbers. Each mode starts with the smoke tests (one GEMM of a few tiles per config, one program): if
# they fail or hang, that mode's long steps are skipped (a hang then costs SMOKE_S, not TEST_S + BENCH_S).
# pytest-timeout (in the GPU image) ends a hung test after PER_TEST_S, printing its name and stack, and the
# run goes on with the next step. Step limits: SMOKE_S / TEST_S / BENCH_S (60 / 120 (fp8: 200) / 170 s), each
# cut to what is left of TOTAL_S (560 s: the run ends inside a 600 s device call whatever hangs). MODES="coop" or
# "pp" runs one mode (two device calls, if one call's 560 s cuts the second mode's bench). MODES=fp8 (a device
# call of its own): the FP8 block-scaled Gluon kernel (kernels/moe_gluon_fp8.py, tests/test_kernels_moe_gluon_fp8.py):
# its smoke, its tests, then bench_moe_gluon.py --fp8 (old FP8 path vs Triton TMA FP8 vs Gluon FP8, fraction of
# the FP8 floor). Logs and the bench JSON under $OUT, named by mode (the device tool brings back only names of
# letters, digits, '.', '_' and '-').
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-560}
TO=()
python3 -c "import pytest_timeout" 2>/dev/null && TO=(--timeout "${PER_TEST_S:-60}" --timeout-method thread)

step() {  # step LIMIT_S LOG CMD...: CMD under LIMIT_S (or what is left of TOTAL_S), output to LOG; its status
  local lim=$1 log=$2 left=$((TOTAL_S - SECONDS)); shift 2
  ((left < lim)) && lim=$left
  if ((lim < 15)); then echo "   skipped: no time left"; return 124; fi
  timeout -k 10 "$lim" "$@" >"$log" 2>&1
  local rc=$?
  ((rc == 124 || rc == 137)) && echo "   TIMED OUT after ${lim}s (a hang?): see $log"
  return $rc
}

for mode in ${MODES:-coop pp}; do
  tests=tests/test_kernels_moe_gluon.py; fp8=(); test_s=120
  if [ $mode = coop ]; then sel="not pp"; gl=gluon,gluon64
  elif [ $mode = pp ]; then sel="pp"; gl=gluon_pp,gluon64_pp
  else sel="gpu"; gl=gluon,gluon64,gluon64_pp; tests=tests/test_kernels_moe_gluon_fp8.py; fp8=(--fp8)
    test_s=200; fi  # (fp8: the weights quantized per test, GLM-4.5-Air's too)
  echo "== $mode: GPU smoke tests -k 'smoke and $sel'"
  step "${SMOKE_S:-60}" "$OUT/smoke_$mode.log" python3 -m pytest -v -rfE -m gpu $tests \
    -k "smoke and $sel" ${TO[@]+"${TO[@]}"}
  rc=$?
  grep -E "PASSED|FAILED|ERROR|Timeout|passed|failed" "$OUT/smoke_$mode.log" | tail -25
  if ((rc != 0)); then echo "== $mode: smoke failed (rc $rc): its tests and bench skipped"; continue; fi
  echo "== $mode: GPU tests -k 'not smoke and $sel'"
  step "${TEST_S:-$test_s}" "$OUT/tests_$mode.log" python3 -m pytest -q -rfE -m gpu $tests \
    -k "not smoke and $sel" ${TO[@]+"${TO[@]}"}
  tail -8 "$OUT/tests_$mode.log"
  echo "== $mode: bench $gl"
  step "${BENCH_S:-170}" "$OUT/bench_$mode.log" python3 benchmarks/bench_moe_gluon.py --m 1024,4096,16384 \
    --gluon "$gl" --sweep ${fp8[@]+"${fp8[@]}"} --out "$OUT/$mode"
  grep -E "ceilings|moe_gluon|summary|Error|error" "$OUT/bench_$mode.log"
done
