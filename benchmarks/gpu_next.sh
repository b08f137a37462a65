#!/usr/bin/env bash
# The next device calls after 2026-11-30's session 11 (issues 16, 17). One H200 unless said; PHASES picks (default
# A); each phase fits one call (< 10 min: one phase a call). Copy tables only where the printed numbers say they won.
#   phase A (~8 min): the Gluon warp-specialized grouped GEMM for the large-M MoE (kernels/moe_gluon.py, session 11,
#     never run on a GPU): `bash benchmarks/gpu_session_moe_gluon.sh` (its GPU tests, cooperative and ping-pong
#     apart under their own timeouts, then old path vs Triton TMA vs Gluon at M=1024/4096/16384). If a Gluon config
#     wins, put "gluon": 1 and its tiles into the H200 bf16 table's "tma" entry by hand (tune_moe_tma.py does not
#     know the key) and re-run bench_e2e's prefill8k.
#   phase D (~7 min): the FP8 block-scaled Gluon grouped GEMM (kernels/moe_gluon_fp8.py, session 11, never run):
#     `MODES=fp8 bash benchmarks/gpu_session_moe_gluon.sh` (smoke, tests, old FP8 vs Triton TMA FP8 vs Gluon FP8).
#   phase B (~6 min): the Gluon FA3-style prefill attention (kernels/attention/prefill_gluon.py, session 11, never
#     run on a GPU): its GPU test, then bench_attention Triton vs Gluon vs SDPA.
#   phase C (~2 min): MoE align with the SCAN's one-pass last program (session 11) against the two-pass module it
#     replaced (bench_align --baseline), 128 and 160 experts; re-tune SCAN_CHUNKS from the scan / noscan columns.
#   phase 2 (~8 min): the kernel half of the GPU tests, four pytest-xdist workers (session 11 ran 85 of 236 in 500 s
#     in one process; not run in session 11: test_moe_gemv, test_kernels_router_fused, test_kernels_fp8,
#     test_kernels_moe_w8, most of test_kernels_moe_tma). phase 3: the engine half (session 11: 15 passed, 4 skipped).
#   phase 4 (~4 min): fresh profiles, PDL off (each kernel's time its own): B=1 and B=64 bf16, FP8 B=1 and B=64.
#   phase 5 (nvidia-h200-x2, ~4 min): the EP start-up warmup's no-compile test (tests/test_gpu_compile.py -k
#     expert_parallel: DP=2/EP=2, prefills eager and in mixed graphs), then where the eager sparse exchange's ~1 ms
#     goes (cProfile of dispatch + combine).
#   phase 6 (~3 min): the B=1 qkv projection on our GEMV instead of cuBLAS in the PDL chain (cuBLAS takes no part
#     in PDL): the step with cuBLAS, then with two GEMV tiles forced for n5120_k2048 at M=1.
#   phase 1 (~5 min, low priority): the MoE GEMV at M=2,4,8 with 16-bit K steps of 1024-2048, then the step at B=1/8.
# Session 11 settled: FUSED_FP8_DOT stays off (lost at B=1/64), the fused decode prologue's cap is 256 rows.
set -uo pipefail
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema pytest-xdist 2>&1 | tail -1
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
PHASES=${PHASES:-A}
if [[ $PHASES == *1* ]]; then
  timeout 200 python3 benchmarks/tune_moe.py --gemv --shapes qwen3 --m 2,4,8 --dtypes bf16 --jobs 16 \
    --out $OUT/gemv 2>&1 | grep -E "qwen3|summary" | tail -12
  cp $OUT/gemv/configs/*.json kernels/configs/ 2>/dev/null && echo "retuned GEMV table in use for the step below"
  timeout 100 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1,8 --prefill 1024 --async-scheduling --steps 30 \
    --out $OUT/e2e_gemv.json 2>&1 | grep SUMMARY
  timeout 80 python3 benchmarks/bench_e2e.py --no-hf --quantization fp8 --batch-sizes 1 --prefill 1024 \
    --async-scheduling --steps 30 --out $OUT/e2e_fp8_b1.json 2>&1 | grep SUMMARY
fi
GPU_TESTS=$(grep -l "mark.gpu" tests/test_*.py | sort)
FIRST=$(echo "$GPU_TESTS" | grep -E "test_(kernels|attention|linear|moe|decode|router|pdl|prefill)" | grep -vE "test_(attention_gluon|kernels_moe_gluon)")  # (phases A, B run them)
if [[ $PHASES == *2* ]]; then
  # four pytest workers a file each (pytest-xdist from .wheelhouse): the kernel tests are compile-bound on the host's
  # 16 cores, and none sizes itself to the GPU's free memory. Session 11 ran them in one process: 85 of 236 in 500 s
  timeout 500 python3 -m pytest -q -m gpu -n 4 --dist loadfile -rf $FIRST > $OUT/gpu_tests_half1.log 2>&1
  grep -E "passed|failed|FAILED|^ERROR" $OUT/gpu_tests_half1.log | tail -12
fi
if [[ $PHASES == *3* ]]; then
  timeout 500 python3 -m pytest -q -m gpu $(comm -23 <(echo "$GPU_TESTS") <(echo "$FIRST")) 2>&1 | tail -6
fi
if [[ $PHASES == *4* ]]; then
  timeout 120 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1,64 --prefill 1024 --async-scheduling --steps 30 \
    --no-pdl --profile 1,64 --out $OUT/e2e_profile.json 2>&1 | grep -vE "^\s*$" | tail -40
  timeout 100 python3 benchmarks/bench_e2e.py --no-hf --quantization fp8 --batch-sizes 1,64 --prefill 1024 \
    --async-scheduling --steps 30 --no-pdl --profile 1,64 --out $OUT/e2e_fp8_profile.json 2>&1 | grep -vE "^\s*$" | tail -25
fi
if [[ $PHASES == *5* ]] && [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  timeout 200 python3 -m pytest -q -m gpu tests/test_gpu_compile.py -k expert_parallel -rf 2>&1 | tail -8
  timeout 150 python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_all2all_dist.py --tokens 1,64 \
    --backends sparse --no-graphs --host-profile --reps 30 --out $OUT/a2a_profile.json 2>&1 | grep -v "^\s*$" | head -60
fi
if [[ $PHASES == *6* ]]; then
  for tile in cublas '{"BLOCK_N": 64, "BLOCK_K": 128, "DOT": 1, "SPLIT_K": 8, "num_stages": 3, "num_warps": 4}' \
              '{"BLOCK_N": 8, "BLOCK_K": 256, "SPLIT_K": 8, "num_stages": 1, "num_warps": 4}'; do
    TILE="$tile" timeout 80 python3 -c "
import functools, json, os, runpy, sys
import kernels.linear.gemv_config as gc
tile = os.environ['TILE']
if tile != 'cublas':
    load = gc._load.__wrapped__
    gc._load = functools.lru_cache(maxsize=16)(lambda path, fp8=False: load(path, fp8) if fp8 else
                                               dict(load(path, fp8), n5120_k2048={1: json.loads(tile)}))
sys.argv = ['bench_e2e.py', '--no-hf', '--batch-sizes', '1', '--prefill', '1024', '--async-scheduling', '--steps', '30',
            '--out', '$OUT/e2e_qkv_gemv.json']
runpy.run_path('benchmarks/bench_e2e.py', run_name='__main__')" 2>&1 | grep SUMMARY | sed "s/^/qkv=$tile /"
  done
fi
if [[ $PHASES == *A* ]]; then
  bash benchmarks/gpu_session_moe_gluon.sh
fi
if [[ $PHASES == *D* ]]; then
  MODES=fp8 bash benchmarks/gpu_session_moe_gluon.sh
fi
if [[ $PHASES == *B* ]]; then
  # a wrong barrier phase or byte count hangs rather than fails: each Gluon launch in the tests ends the process
  # within 20 s printing "GLUON HANG" and its variant. The smoke first (one small fp16 call per variant, a test id
  # each), then the matrix one variant a call, only where its smoke passed; the bench only the variants that passed
  timeout 150 python3 -m pytest -v -m gpu tests/test_attention_gluon.py -k fp16_head_dim_64 > $OUT/gluon_smoke.log 2>&1
  grep -E "PASSED|FAILED|ERROR|GLUON HANG|passed|failed" $OUT/gluon_smoke.log | tail -6
  GL_OK=""
  for v in default split1 pingpong; do
    grep -q "fp16_head_dim_64_gpu\[$v\] PASSED" $OUT/gluon_smoke.log || { echo "gluon $v: smoke did not pass, skipped"; continue; }
    case $v in default) K="(prefill_gpu and (default or n64)) or (more_shapes and default)";;
                *) K="(prefill_gpu or more_shapes) and $v";; esac
    timeout 150 python3 -m pytest -q -m gpu tests/test_attention_gluon.py -k "$K" -rf > $OUT/gluon_$v.log 2>&1 \
      && GL_OK="$GL_OK $v"
    echo "gluon $v:"; grep -E "^FAILED|GLUON HANG|passed|failed" $OUT/gluon_$v.log | tail -4
  done
  GL_TILES='1, {"num_stages": 3}, {"BLOCK_N": 64, "num_stages": 3}'
  [[ $GL_OK == *split1* ]] && GL_TILES="$GL_TILES"', {"num_stages": 3, "split_wg": 1}'
  [[ $GL_OK == *pingpong* ]] && GL_TILES="$GL_TILES"', {"num_stages": 3, "split_wg": 2}'
  if [[ $GL_OK == *default* ]]; then
    timeout 200 python3 benchmarks/bench_attention.py --ctxs "" --out $OUT/gluon_attn --gluon "[$GL_TILES]" 2>&1 | tail -12
    timeout 120 python3 benchmarks/bench_attention.py --ctxs "" --no-prefill --extend 8192:122880 --out $OUT/gluon_ext \
      --gluon "[1$([[ $GL_OK == *pingpong* ]] && echo ', {"num_stages": 3, "split_wg": 2}')]" 2>&1 | tail -5
  fi
fi
if [[ $PHASES == *C* ]]; then
  # the baseline travels in .devrun (carried; the device has no git history): before the call, here,
  #   git show 8e020b2~1:kernels/moe_align.py > .devrun/align_two_pass.py
  [ -s .devrun/align_two_pass.py ] || echo "(no .devrun/align_two_pass.py: no baseline column)"
  for e in 128 160; do
    timeout 80 python3 benchmarks/bench_align.py --experts $e --m 256,1024,2048,4096,8192 \
      $([ -s .devrun/align_two_pass.py ] && echo --baseline .devrun/align_two_pass.py) --out $OUT/align_e$e.json 2>&1 \
      | tail -6
  done
  timeout 60 python3 -m pytest -q -m gpu tests/test_kernels_moe.py -k align 2>&1 | tail -2
fi
echo "done in $SECONDS s"
