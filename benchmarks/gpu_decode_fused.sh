#!/usr/bin/env bash
# The fused decode prologue (issue 16; kernels/attention/decode_fused.py), one H200, ~10 min, each command < 2 min:
#   its GPU tests (bit for bit the two launches at Qwen3-30B-A3B shapes B=1/8/64, CUDA-graph replays; the engine's
#   greedy tokens with MOE_RT_FUSE_DECODE_PROLOGUE on and off, bf16 and FP8 KV), the prologue's and the PDL chain's
#   GPU tests (the prologue now sums its RMS statistic in fp64 and rotates by explicit FMAs; the chain runs the fused
#   decode too, 200 graph replays PDL on vs off), the kernel-level A/B
#   (one CUDA graph of 8 layers' attention: prologue + decode + merge vs fused + merge), then the decode step off/on.
set -uo pipefail
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 115 python3 -m pytest -q -m gpu tests/test_decode_fused.py tests/test_kernels_qkv_prologue.py 2>&1 | tail -3
timeout 115 python3 -m pytest -q -m gpu tests/test_decode_fused_model.py 2>&1 | tail -3
timeout 115 python3 -m pytest -q -m gpu tests/test_pdl.py -k chain 2>&1 | tail -3
timeout 115 python3 -m pytest -q -m gpu tests/test_pdl.py -k engine 2>&1 | tail -3
MOE_RT_FUSE_DECODE_PROLOGUE=1 timeout 115 python3 -m pytest -q -m gpu tests/test_gpu_compile.py \
  -k "Qwen3MoeForCausalLM and auto" 2>&1 | tail -3  # no compile on the serving path with the fusion on
timeout 115 python3 benchmarks/bench_decode_fused.py --batches 1,8,64 --ctxs 1024,4096 --kv bf16,fp8w \
  --out $OUT/decode_fused.json 2>&1 | tail -13
for f in 0 1; do
  MOE_RT_FUSE_DECODE_PROLOGUE=$f timeout 115 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1,8,64 \
    --async-scheduling --steps 30 --out $OUT/e2e_decode_prologue$f.json 2>&1 | grep SUMMARY | sed "s/^/decode_prologue=$f /"
done
echo "done in $SECONDS s"
