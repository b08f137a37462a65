#!/usr/bin/env bash
# The next device calls after 2026-11-30's session 9 (issues 16, 17). One H200; PHASES picks (default 123); each phase
# fits one call (< 10 min); copy tables from $OUT/tune/configs only where the printed numbers say they won.
#   phase 1 (~5 min): GPU tests of what session 9 merged after its last GPU call: the fused decode prologue (now on at
#     <= 16 decode rows) at model level, in the PDL chain and without compiles after start-up; the weight-only FP8
#     MoE tests (cut by a limit in call 8) incl. the PTX-vs-cast test; the FP8 extend scratch and its compile check.
#   phase 2 (~5 min): the fused prologue's kernel-level A/B (bench_decode_fused.py) and the decode step with it off /
#     on at B=1,8 and, with the row cap lifted, at B=64 (if B=64 wins, raise models/layers.py FUSED_DECODE_MAX_ROWS);
#     then FP8 weights end to end at B=1,8,64 (not re-measured since session 8 at B=1).
#   phase 4 (nvidia-h200-x2, ~2 min): where the eager sparse exchange's ~1 ms goes (session 9: host ops in the
#     ranks cost what they cost alone; one uneven NCCL all_to_all is ~0.1 ms): cProfile of dispatch + combine.
#   phase 3 (~6 min): tune_moe in the weight-only FP8 modes: Qwen3 at M=8,256 and GLM-4.5-Air at M=64 (the tuner
#     writes the table in use with those buckets replaced); then bench_moe at M=32,128 (bucket 64's edges).
set -uo pipefail
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
PHASES=${PHASES:-123}
if [[ $PHASES == *1* ]]; then
  timeout 120 python3 -m pytest -q -m gpu tests/test_decode_fused_model.py tests/test_decode_fused.py 2>&1 | tail -2
  timeout 120 python3 -m pytest -q -m gpu tests/test_pdl.py -k "chain or engine" 2>&1 | tail -2
  timeout 120 python3 -m pytest -q -m gpu tests/test_gpu_compile.py -k "Qwen3MoeForCausalLM" 2>&1 | tail -2
  timeout 90 python3 -m pytest -q -m gpu tests/test_kernels_moe.py tests/test_kernels_moe_w8.py \
    -k "fused_experts_gpu or w8" 2>&1 | tail -2
  timeout 60 python3 -m pytest -q -m gpu tests/test_attention_fp8_scratch.py 2>&1 | tail -2
fi
if [[ $PHASES == *2* ]]; then
  timeout 110 python3 benchmarks/bench_decode_fused.py --batches 1,8,64 --ctxs 1024,4096 --kv bf16,fp8w \
    --out $OUT/decode_fused.json 2>&1 | tail -13
  for f in 0 1; do
    MOE_RT_FUSE_DECODE_PROLOGUE=$f timeout 100 python3 -c "
import runpy, sys
import models.layers
models.layers.FUSED_DECODE_MAX_ROWS = 1024  # the cap lifted: B=64 measured fused too
sys.argv = ['bench_e2e.py', '--no-hf', '--batch-sizes', '1,8,64', '--prefill', '1024', '--async-scheduling',
            '--steps', '30', '--out', '$OUT/e2e_prologue$f.json']
runpy.run_path('benchmarks/bench_e2e.py', run_name='__main__')" 2>&1 | grep SUMMARY | sed "s/^/decode_prologue=$f /"
  done
  # B=16, the row cap itself (batches 5-16 use the 32-token decode tile, where the fused kernel holds 128 registers
  # instead of 80), and the prefill prologue's cost with its fp64 RMS sum (compare with a checkout of 8a209c6^1)
  for f in 0 1; do
    MOE_RT_FUSE_DECODE_PROLOGUE=$f timeout 80 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 16 --prefill 1024 \
      --async-scheduling --steps 30 --out $OUT/e2e_b16_prologue$f.json 2>&1 | grep SUMMARY | sed "s/^/decode_prologue=$f /"
  done
  timeout 60 python3 -c "import torch,triton;from kernels.attention.qkv_prologue import qkv_prologue;\
from kernels.rope import rope_cos_sin;D='cuda';T=8192;qkv=torch.randn(T,40*128,device=D,dtype=torch.bfloat16);\
cs=rope_cos_sin(128,T,1e6,device=D);w=torch.ones(128,device=D,dtype=torch.bfloat16);\
kc=torch.zeros(T//16,16,4,128,device=D,dtype=torch.bfloat16);vc=kc.clone();pos=torch.arange(T,device=D);\
print('prefill prologue 8k tokens us', 1e3*triton.testing.do_bench(lambda:qkv_prologue(qkv,pos,cs,w,w,1e-6,kc,vc,pos)))"
  timeout 100 python3 benchmarks/bench_e2e.py --no-hf --quantization fp8 --batch-sizes 1,8,64 --prefill 1024 \
    --async-scheduling --steps 30 --out $OUT/e2e_fp8.json 2>&1 | grep SUMMARY
fi
if [[ $PHASES == *3* ]]; then
  timeout 170 python3 benchmarks/tune_moe.py --shapes qwen3 --m 8,256 --dtypes fp8 --jobs 14 --out $OUT/tune 2>&1 \
    | grep -E "w8_mma=|act_fp8=|^best|failed|wrote" | cut -c1-220
  timeout 120 python3 benchmarks/tune_moe.py --shapes glm45air --m 64 --dtypes fp8 --jobs 14 --out $OUT/tune 2>&1 \
    | grep -E "w8_mma=|^best|failed|wrote" | cut -c1-220
  timeout 60 python3 benchmarks/bench_moe.py --shapes qwen3 --dtypes fp8 --m 32,128 --no-ref --out $OUT/bench 2>&1 \
    | grep -E "^moe|summary" | cut -c1-400
fi
if [[ $PHASES == *4* ]] && [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  timeout 150 python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_all2all_dist.py --tokens 1,64 \
    --backends sparse --no-graphs --host-profile --reps 30 --out $OUT/a2a_profile.json 2>&1 | grep -v "^\s*$" | head -60
fi
echo "done in $SECONDS s"
