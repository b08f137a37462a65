#!/usr/bin/env bash
# Long context on one GPU (issue 17), from the repo root through the device tool:
#   bash benchmarks/gpu_long_context.sh            # kernel tests + decode/extend attention at 32k and 128k
#   E2E=1 bash benchmarks/gpu_long_context.sh      # plus the engine at Qwen3-30B-A3B shapes (a few minutes more)
# 1. GPU kernel tests: FP8 store (bit-equal to torch), decode/extend on an FP8 cache vs the reference and
#    vs a bf16 cache at Qwen3-30B-A3B and GLM-4.5-Air head shapes (prints the relative errors).
# 2. Decode attention (Qwen3-30B-A3B and GLM-4.5-Air heads), B=1 and 16 at ctx 32k and 128k, bf16 and FP8 KV, one-launch vs two-launch merge,
#    as fractions of copy bandwidth; an 8k chunk over a 120k cached prefix as a fraction of the matmul rate.
# 3. (E2E=1) engine steps at ctx 128k (yarn), bf16 vs FP8 KV: decode B=1/16, TTFT of a 128k prompt in 8k
#    chunks, how many 128k sequences fit at --gpu-memory-utilization 0.9.
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/long_context.log") 2>&1
python -m pytest -m gpu -q -s tests/test_kernels_attention.py 2>&1 | grep -E "fp8 vs bf16|passed|failed|Error" | tail -12
for shape in qwen3-30b-a3b glm-4.5-air; do
  python benchmarks/bench_attention.py --out "$OUT/$shape" --shape $shape --batches 1,16 --ctxs 32768,131072 \
    --kv-dtypes bf16,fp8 --decode-merge fused,separate --extend 8192:122880 --no-prefill ${ATTN_ARGS:-}
done
if [ "${E2E:-0}" = 1 ]; then
  for kv in auto fp8; do
    python benchmarks/bench_e2e.py --no-hf --batch-sizes 1,16 --ctx 131000 --max-model-len 131072 \
      --prompt-len 131000 --prefill 8192 --steps 10 --kv-cache-dtype $kv --gpu-memory-utilization 0.9 \
      --out "$OUT/e2e_long_$kv.json" | grep -E "^ours|SUMMARY|skip"
  done
fi
echo "==== summary"
grep -h "summary\|SUMMARY" "$OUT/long_context.log" | grep -v "^grep"
