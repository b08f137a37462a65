#!/usr/bin/env bash
# Session 8 (issue 16), one H200, ~4 minutes: the FP8 GEMV tuned for Qwen3-30B-A3B's o_proj (the first run's budget
# ended before it) and merged into the table, then the decode step with the MoE top-k sum fused into the next
# RMSNorm off (MOE_RT_FUSE_MOE_SUM=0) and on, bf16, and FP8 with both changes.
set -uo pipefail
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 140 python3 benchmarks/tune_linear_gemv.py --weights fp8 --shapes 2048x4096 --tp 1 --m 1,2,4,8 \
  --budget-s 90 --out-dir $OUT/o 2>&1 | grep -E "fp8 .*M=|summary" | cut -c1-220
python3 - "$OUT/o/configs/linear_gemv_fp8_NVIDIA_H200.json" kernels/configs/linear_gemv_fp8_NVIDIA_H200.json <<'PY'
import json, sys
new, path = sys.argv[1], sys.argv[2]
table = json.load(open(path))
for key, buckets in json.load(open(new)).items():
    table.setdefault(key, {}).update(buckets)
json.dump(table, open(path, "w"), indent=1, sort_keys=True)
print("FP8 GEMV table:", {k: sorted(v) for k, v in table.items()})
PY
cp kernels/configs/linear_gemv_fp8_NVIDIA_H200.json $OUT/
for fuse in 0 1; do
  MOE_RT_FUSE_MOE_SUM=$fuse timeout 120 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1,8 --async-scheduling \
    --steps 30 --out $OUT/e2e_bf16_fuse$fuse.json 2>&1 | grep -E "SUMMARY" | sed "s/^/fuse=$fuse /"
done
timeout 120 python3 benchmarks/bench_e2e.py --no-hf --quantization fp8 --batch-sizes 1,8 --async-scheduling --steps 30 \
  --out $OUT/e2e_fp8.json 2>&1 | grep -E "SUMMARY"
echo "done in $SECONDS s"
