#!/usr/bin/env bash
# The next device calls after 2026-11-30's session 8 (issues 16, 17). One H200 unless said; PHASES picks (default 123).
#   phase 1 (~6 min): GPU tests of what session 8 merged after its last GPU call (the served engine's fused top-k sum,
#     the restored FP8 o_proj GEMV entries, the router-norm fusion's bit-exactness, the attention q saturation), then
#     the decode step with the router norm off/on (MOE_RT_FUSE_ROUTER_NORM, default off until this measures it) and
#     the served engine's step with the fused top-k sum off/on (it was not fused there before the review).
#   phase 2 (~4 min): FP8-KV decode: the widening kernels (the table) vs the e4m3 dots with the two-term q (fp8_q2,
#     the accurate form) and without; then the tuner over the fp8_q2 tiles (writes $OUT/tune/configs: copy it to
#     kernels/configs/ only if fp8_q2 won: the tuner sweeps no one-term-q tile for the table).
#   phase 3 (~4 min): the FP8 GEMV for GLM-4.5-Air's projections (session 8's budget ran out before them); the table
#     written starts from the checked-in one.
#   phase 4 (nvidia-h200-x2, ~1 min): benchmarks/probe_host_ops.py, the eager expert all2all's 70-200 us per op.
set -uo pipefail
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
PHASES=${PHASES:-123}
if [[ $PHASES == *1* ]]; then
  timeout 300 python3 -m pytest -q -m gpu tests/test_router_norm.py 2>&1 | tail -3
  timeout 200 python3 -m pytest -q -m gpu tests/test_moe_sum_norm.py tests/test_linear_gemv_fp8.py \
    tests/test_attention_fp8_dot.py tests/test_pdl.py 2>&1 | tail -3
  timeout 60 python3 benchmarks/bench_router.py --out $OUT/br --m 1,2,4,8 --shapes qwen3,glm45air --norm 2>&1 | tail -8
  for f in 0 1; do
    MOE_RT_FUSE_ROUTER_NORM=$f timeout 100 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1,8,64 \
      --async-scheduling --steps 30 --out $OUT/e2e_router_norm$f.json 2>&1 | grep SUMMARY | sed "s/^/router_norm=$f /"
  done
  for f in 0 1; do
    MOE_RT_FUSE_MOE_SUM=$f timeout 100 python3 benchmarks/bench_e2e.py --no-hf --as-served --batch-sizes 1,8 \
      --async-scheduling --steps 30 --out $OUT/e2e_served_sum$f.json 2>&1 | grep SUMMARY | sed "s/^/served moe_sum=$f /"
  done
fi
if [[ $PHASES == *2* ]]; then
  timeout 150 python3 benchmarks/bench_attention.py --out $OUT/bench --batches 1,16,64 --ctxs 4096,32768,131072 \
    --kv-dtypes fp8,fp8dot2,fp8dot2q2 --no-prefill 2>&1 | grep -E "^attn decode|summary" | cut -c1-170
  timeout 150 python3 benchmarks/tune_attention.py --out $OUT/tune --only decode --kv-dtypes fp8 --fp8-dot-only \
    --budget-s 100 2>&1 | grep -E "^decode B|summary" | cut -c1-200
fi
if [[ $PHASES == *3* ]]; then
  timeout 230 python3 benchmarks/tune_linear_gemv.py --weights fp8 --shapes glm45air --tp 1 --m 1,2,4,8 \
    --budget-s 170 --out-dir $OUT/gemv 2>&1 | grep -E "fp8 .*M=|summary" | cut -c1-200
fi
if [[ $PHASES == *4* ]] && [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  python3 benchmarks/probe_host_ops.py
  timeout 90 python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/probe_host_ops.py 2>&1 | grep "host us"
fi
echo "done in $SECONDS s"
