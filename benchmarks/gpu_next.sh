#!/usr/bin/env bash
# The next device calls after 2026-12-01's session 21 (issue 17 blocked on one row: B=1 32k FP8-KV decode attention at
# 0.52 of copy bandwidth; RESULTS.md session 21 says where its time goes). One H200 unless said; PHASES picks
# (default H); each phase fits one call (< 10 min: one phase a call; its timeouts sum to <= 560 s, the rest is the pip
# line and start-up). Copy tables only where the printed numbers say they won.
# Session 21 (29 min, one H200) ran decode_timeline.py and decode_ablate.py's new variants (RESULTS.md), a Gluon
# decode kernel (branch exp/gluon-decode), then the GPU test halves: 2 and 7 all passed (79 + 155, once the pip line
# below installed msgspec again), 3 without tests/test_structured_output.py (jsonschema's dependencies had no
# wheels here then; they do now, see below) passed every test it reached before the call's limit (~80%: no failure).
# Next, in this order: phase 3 again (it runs all its files under one timeout; if it does not fit, by hand a few files a
# call: python3 -m pytest -m gpu tests/<file>), M on two GPUs, 1 and B.
#   phase S (~2 min): bench_e2e --step-gaps at B=1 bf16 / FP8: host time and waits, the device's idle gaps, the host's
#     CUDA calls and a chrome trace ($OUT/*_trace_b1.json.gz); phase R (~3 min): fuse_router_norm on / off at B=1, 8.
#   phase M (x2, ~6 min): the demo model served with DP=2+EP, then TP=2 (the README's answer each), then the
#     multi-GPU tests (TP=2 vs transformers, idle-rank dummy graphs, static all2all in graphs, the eager exchange's
#     sync, the EP no-compile test with and without graphs).
# Already run (kept for reruns):
#   phase L (~5 min): bench_moe_gluon.py --shape glm45air at M = 1024, 2048, 4096, bf16 and FP8: where a Gluon
#     column beats "old", give GLM-4.5-Air's H200 tables (moe_E128_H4096_I1408_*) a "tma" entry like Qwen3's
#     (default_gluon_config / default_gluon_fp8_config, the winning BLOCK_M, min_rows = tokens x 8), then PHASES=P's
#     SHAPE=glm-4.5-air PHASES=P (the A/B end to end at 1024 and 2048 tokens).
#   phase E (~7 min): the prefill with the Gluon kernels on (the tables) / off (benchmarks/gluon_off.py drops their
#     Gluon entries in-process), one 8k chunk, bf16 and FP8 (experts + KV); then the 8k chunk over a 120k cached
#     prefix (issue 17: >= 0.60 of the matmul rate), bf16 and FP8 KV (its fp16 scratch now on the Gluon kernel), on /
#     off. If "off" wins a row, take that table entry back out.
#   phase F (~6 min): 128k end to end with the Gluon prefill on: TTFT of a 131k prompt in 8k chunks, decode B=1/16
#     at ctx 128k, bf16 and FP8 KV (E2E=1 bash benchmarks/gpu_long_context.sh's engine rows; session 9 for before).
#   phase G (~8 min): the Gluon kernels' full GPU tests (session 12 ran only their smoke tests, and 67 of the
#     attention tests): tests/test_kernels_moe_gluon.py -k "not pp", tests/test_kernels_moe_gluon_fp8.py,
#     tests/test_attention_gluon.py -k "split1 or default" (each under its own timeout).
#   phase A / D: the Gluon MoE GEMM benches with --sweep (`bash benchmarks/gpu_session_moe_gluon.sh`, MODES=coop /
#     fp8): a tile better than the default goes into the tables' "tma" entry (session 13: none by more than 5%; at
#     M=1024 / 2048 Gluon BLOCK_M 64 won FP8 at both, bf16 at 2048 only: RESULTS.md).
#   phase B (~6 min): the Gluon attention tests per variant, then bench_attention Triton vs Gluon vs SDPA incl. extend.
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
#   phase H (~9 min, one H200): the EP local-expert tables (tune_moe.py --ep: none exist, every EP rank runs
#     default_config): qwen3 bf16 at EP 8 (16 local experts) then EP 2 (64), on the rows a rank receives in steps of
#     T = 1..4096 tokens a rank (buckets: received rows N, e.g. EP 8: 8 .. 21870), each sweep under 120 s (estimate,
#     unmeasured: ~20 s of precompile, then ~6 s a step size, from the bf16 / FP8 sweeps above); then the TMA / Gluon
#     entries at T = 1024, 4096, each under 130 s (may print nothing on a cold Triton cache: it did in 170-240 s in
#     sessions 6-7). The tables come back in $OUT/ep8/configs, $OUT/ep2/configs (moe_E16_..., moe_E64_...): copy in
#     by hand where the printed numbers beat default_config.
# Settled: FUSED_FP8_DOT stays off (session 11), the fused decode prologue's cap is 256 rows; Gluon ping-pong MoE
# lost to the cooperative kernel (session 12).
# Files the device lacks, made here before a call (ignored, carried): .wheelhouse (../shared/device/wheelhouse.sh,
# plus the pytest-xdist and execnet wheels for phase 2, and for the image's Python 3.12 `pip download --python-version
# 3.12 --only-binary=:all: -d .wheelhouse jsonschema setproctitle`: tests/test_structured_output.py imports
# jsonschema), .devrun/align_two_pass.py (phase C: below).
set -uo pipefail
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  llguidance pytest-xdist pytest-timeout 2>&1 | tail -1
# one at a time, as each may lack a wheel for the image's Python 3.12 (or a dependency): one missing name fails a
# whole pip line, and with it msgspec (session 21's first test runs: 7 engine tests failed on the import)
for pkg in setproctitle jsonschema; do
  python3 -m pip install -q --no-index --find-links .wheelhouse $pkg > /dev/null 2>&1 || echo "(no $pkg wheel here)"
done
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
PHASES=${PHASES:-H}
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
if [[ $PHASES == *2* || $PHASES == *7* ]]; then
  # four pytest workers a file each (pytest-xdist from .wheelhouse): the kernel tests are compile-bound on the host's
  # 16 cores, and none sizes itself to the GPU's free memory. All of them did not fit one call (session 15: 216
  # passed, 0 failed, in 560 s at ~92%): phase 2 runs the first 12 files (to test_kernels_moe.py), phase 7 the rest
  # (from test_kernels_moe_tma.py: 12, not 13, since test_decode_early_kv.py went, so that the halves stay as run)
  HALF=$( [[ $PHASES == *2* ]] && echo "$FIRST" | head -12 || echo "$FIRST" | tail -n +13)
  # -v: each test's name and result as it ends, so that a run cut by the limit still names its failures (session 16);
  # a test past 300 s fails (the thread method kills its worker, xdist starts another: a hung compile too)
  # XDIST: workers (the kernel tests are compile-bound: one H200 host's 16 cores take 4; session 17's two-GPU host,
  # 32 cores, ran 8 and 10)
  LOG=$OUT/gpu_tests_half$( [[ $PHASES == *2* ]] && echo 1 || echo 2).log
  timeout 560 python3 -m pytest -v -p no:benchmark -m gpu -n ${XDIST:-4} --dist loadfile -rf --timeout 300 \
    --timeout-method thread --durations 15 $HALF > $LOG 2>&1
  grep -E "FAILED|ERROR" $LOG | cut -c1-200 | head -20
  echo "passed $(grep -c PASSED $LOG), failed $(grep -c '] FAILED' $LOG)"
  grep -E "^=+ .*(passed|failed)" $LOG || echo "(cut by the limit before pytest's summary)"
fi
if [[ $PHASES == *3* ]]; then
  timeout 500 python3 -m pytest -v -p no:benchmark -m gpu $(comm -23 <(echo "$GPU_TESTS") <(echo "$FIRST")) \
    > $OUT/gpu_tests_engine.log 2>&1
  grep -E "FAILED|ERROR" $OUT/gpu_tests_engine.log | cut -c1-200 | head -20
  tail -1 $OUT/gpu_tests_engine.log
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
if [[ $PHASES == *S* ]]; then  # a decode step beyond its graph: host time and waits, the device's idle gaps
  timeout 120 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1 --prefill 1024 --steps 30 --step-gaps 1 \
    --out $OUT/e2e_gaps.json 2>&1 | grep -E "^ours decode|step gaps|^    |host CUDA|adds to the step|SUMMARY|Error|Traceback"
  timeout 100 python3 benchmarks/bench_e2e.py --no-hf --quantization fp8 --batch-sizes 1 --prefill 1024 --steps 30 \
    --step-gaps 1 --out $OUT/e2e_gaps_fp8.json 2>&1 | grep -E "^ours decode|step gaps|^    |host CUDA|adds to the step|SUMMARY|Error|Traceback"
  gzip -f $OUT/*_trace_b*.json
fi
if [[ $PHASES == *T* ]]; then  # decode at ctx 1k as served: graphs sized for --max-model-len 40960, not 1088
  # (a decode graph's split count follows the table width, i.e. max_model_len: B=1 then runs 64 splits, 48 idle)
  for len in 1088 40960; do
    timeout 100 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1,8 --prefill 1024 --steps 30 \
      --max-model-len $len --out $OUT/e2e_maxlen$len.json 2>&1 | grep SUMMARY | sed "s/^/max-model-len $len: /"
  done
fi
if [[ $PHASES == *U* ]]; then  # issue 17's B=1 32k decode attention as served: what it adds to a step (PDL, graph)
  # (bench_attention times it alone, two launches from an idle GPU: FP8 KV 15.8 us = 0.50 of copy bandwidth)
  for kv in fp8 auto; do
    timeout 140 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1 --ctx 32768 --prefill 8192 --steps 20 \
      --kv-cache-dtype $kv --step-gaps 1 --out $OUT/e2e_32k_$kv.json 2>&1 \
      | grep -E "^ours decode|_decode_kernel|_reduce_kernel|SUMMARY|Error|Traceback" | sed "s/^/kv $kv: /"
  done
fi
if [[ $PHASES == *K* ]]; then  # the FP8 table's cuBLAS routes (CUBLAS 1) on / off end to end: GLM-4.5-Air FP8 prefill
  # at 1024 and 8192 tokens, Qwen3-30B-A3B FP8 at 8192 (session 15: bench_fp8_linear's cuBLAS column; scaled_mm's
  # block-wise recipe takes a bias; an M not a multiple of 4 is CUBLAS_STATUS_NOT_SUPPORTED, hence row_multiple)
  timeout 120 python3 -m pytest -q -m gpu --tb=short tests/test_kernels_fp8_linear.py -k cublas 2>&1 \
    | grep -E "Error|^E |passed|failed" | head -12
  for case in "glm-4.5-air 1024" "glm-4.5-air 8192" "qwen3-30b-a3b 8192"; do
    set -- $case
    for mode in on off; do
      RUN=(python3); [ $mode = off ] && RUN=(python3 benchmarks/cublas_off.py)
      timeout 70 "${RUN[@]}" benchmarks/bench_e2e.py --no-hf --shape $1 --batch-sizes 1 --prefill $2 \
        --steps 5 --quantization fp8 --out $OUT/e2e_$1_prefill$2_cublas_$mode.json 2>&1 \
        | grep -E "^ours prefill|Error|Traceback" | sed "s/^/$1 cublas $mode: /"
    done
  done
fi
if [[ $PHASES == *J* ]]; then  # GLM-4.5-Air's shared expert (45 layers) in FP8, and its attention projections' TP=2
  # shards (a TP rank's table rows are its local shapes: none are routed yet): cuBLAS's block-scaled GEMM vs ours at
  # prefill sizes (phase K routed only the unsharded attention projections); route a bucket where cuBLAS wins
  timeout 200 python3 benchmarks/bench_fp8_linear.py --m 256,512,1024,2048,4096,8192 \
    --shapes glm_shared_gate_up,glm_shared_down,7168x4096,4096x6144 --out $OUT/fp8_linear_j 2>&1 \
    | grep -E "M=|Error|Traceback" | cut -c1-150
fi
if [[ $PHASES == *Q* ]]; then  # the FP8 projections: our W8A8 kernel against cuBLAS's block-scaled FP8 GEMM
  # (FP8 B=64: W8A8 qkv / o 8.1 us each for 10.5 / 8.4 MB, ~0.3 of copy bandwidth, session 13)
  timeout 200 python3 benchmarks/bench_fp8_linear.py --m 1,8,64,256,1024 --shapes qkv,o,glm_qkv,glm_o \
    --out $OUT/fp8_linear 2>&1 | grep -E "M=|summary|Error|Traceback" | cut -c1-260
fi
if [[ $PHASES == *R* ]]; then  # the post-attention norm inside the router (off since it lost at B=8) at B=1 / 8
  for q in bf16 fp8; do
    QARGS=""; [ $q = fp8 ] && QARGS="--quantization fp8"
    for f in 0 1; do
      MOE_RT_FUSE_ROUTER_NORM=$f timeout 90 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1,8 --prefill 1024 \
        --steps 30 $QARGS --out $OUT/e2e_router_norm${f}_$q.json 2>&1 | grep SUMMARY | sed "s/^/router_norm=$f /"
    done
  done
fi
if [[ $PHASES == *M* ]] && [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then  # nvidia-h200-x2
  # the demo model served over both GPUs (DP=2 with EP, then TP=2): the README's answer, then the multi-GPU tests
  Q='{"model": "demo", "messages": [{"role": "user", "content": "What does json.dumps do?"}], "temperature": 0}'
  for flags in "--data-parallel-size 2 --enable-expert-parallel" "--tensor-parallel-size 2"; do
    setsid python3 -m runtime.serve $flags --port 8011 > $OUT/serve_${flags// /_}.log 2>&1 &
    pid=$!
    for i in $(seq 120); do python3 -c "import urllib.request as u; u.urlopen('http://localhost:8011/health')" \
      2>/dev/null && break; sleep 1; done
    echo "$flags (ready after ~$i s):"
    python3 -c "import sys, urllib.request as u; r = u.Request('http://localhost:8011/v1/chat/completions', \
      sys.argv[1].encode(), {'Content-Type': 'application/json'}); print(u.urlopen(r).read()[:400].decode())" "$Q"
    kill -- -$pid; sleep 3; kill -9 -- -$pid 2>/dev/null
  done
  timeout 330 python3 -m pytest -q -m gpu -rf tests/test_tensor_parallel.py::test_tp2_nccl_cuda_graphs_equal_transformers \
    tests/test_dummy_step.py::test_idle_rank_dummy_graphs_nccl tests/test_gpu_all2all.py::test_fixed_capacity_in_cuda_graphs \
    tests/test_all2all_host.py::test_eager_dispatch_combine_syncs_once_on_gpus \
    tests/test_gpu_compile.py::test_no_compile_after_startup_expert_parallel 2>&1 | tail -8
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
if [[ $PHASES == *E* ]]; then
  for q in bf16 fp8; do
    QARGS=""; [ $q = fp8 ] && QARGS="--quantization fp8 --kv-cache-dtype fp8"
    for mode in on off; do
      RUN=(python3); [ $mode = off ] && RUN=(python3 benchmarks/gluon_off.py)
      timeout 105 "${RUN[@]}" benchmarks/bench_e2e.py --no-hf --batch-sizes 1 --prefill 8192 --steps 5 $QARGS \
        --out $OUT/e2e_prefill_${q}_$mode.json 2>&1 | grep -E "^ours prefill|Error|Traceback" | sed "s/^/$q gluon $mode: /"
    done
  done
  for mode in on off; do
    RUN=(python3); [ $mode = off ] && RUN=(python3 benchmarks/gluon_off.py)
    timeout 55 "${RUN[@]}" benchmarks/bench_attention.py --ctxs "" --no-prefill --extend 8192:122880 \
      --kv-dtypes bf16,fp8 --out $OUT/extend_$mode 2>&1 | grep -E "^attn extend|Error|Traceback" | sed "s/^/gluon $mode: /"
  done
fi
if [[ $PHASES == *L* ]]; then  # GLM-4.5-Air's experts on the Gluon kernels (no Gluon entry in its tables yet)
  timeout 250 python3 benchmarks/bench_moe_gluon.py --shape glm45air --m 1024,2048,4096 --gluon gluon,gluon64 \
    --out $OUT/glm_bf16 2>&1 | grep -E "ceilings|moe_gluon|summary|Error" | cut -c1-330
  timeout 250 python3 benchmarks/bench_moe_gluon.py --shape glm45air --m 1024,2048,4096 --gluon gluon,gluon64 --fp8 \
    --out $OUT/glm_fp8 2>&1 | grep -E "ceilings|moe_gluon|summary|Error" | cut -c1-330
fi
if [[ $PHASES == *P* ]]; then  # prefill steps of PREFILL tokens, the tables' Gluon entries on / off (SHAPE: bench_e2e's)
  # (a served step of 1025-2048 tokens runs padded to the 2048 mixed graph: 1024 and 2048 are the sizes that occur)
  # QS: the dtypes (GLM-4.5-Air in bf16, 212 GB, does not fit one H200: QS=fp8); TO_P: each run's timeout
  for n in ${PREFILL:-1024 2048}; do
    for q in ${QS:-bf16 fp8}; do
      QARGS=""; [ $q = fp8 ] && QARGS="--quantization fp8"
      for mode in on off; do
        RUN=(python3); [ $mode = off ] && RUN=(python3 benchmarks/gluon_off.py)
        timeout ${TO_P:-60} "${RUN[@]}" benchmarks/bench_e2e.py --no-hf --shape ${SHAPE:-qwen3-30b-a3b} --batch-sizes 1 \
          --prefill $n --steps 5 $QARGS --out $OUT/e2e_prefill${n}_${q}_$mode.json 2>&1 \
          | grep -E "^ours prefill|Error|Traceback" | sed "s/^/$q gluon $mode: /"
      done
    done
  done
fi
if [[ $PHASES == *F* ]]; then
  for kv in auto fp8; do  # (gpu_long_context.sh's engine rows alone: its kernel tests and benches would not fit)
    timeout 250 python3 benchmarks/bench_e2e.py --no-hf --batch-sizes 1,16 --ctx 131000 --max-model-len 131072 \
      --prompt-len 131000 --prefill 8192 --steps 10 --kv-cache-dtype $kv --gpu-memory-utilization 0.9 \
      --out $OUT/e2e_long_$kv.json 2>&1 | grep -E "^ours|SUMMARY|skip|Error|Traceback"
  done
fi
if [[ $PHASES == *G* ]]; then
  TO=(--timeout 60 --timeout-method thread)
  timeout 200 python3 -m pytest -q -m gpu tests/test_kernels_moe_gluon.py -k "not pp" "${TO[@]}" -rf 2>&1 | tail -4
  timeout 150 python3 -m pytest -q -m gpu tests/test_kernels_moe_gluon_fp8.py "${TO[@]}" -rf 2>&1 | tail -4
  timeout 150 python3 -m pytest -q -m gpu tests/test_attention_gluon.py -k "split1 or default" -rf 2>&1 | tail -4
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
if [[ $PHASES == *H* ]]; then  # EP local-expert tables of one model shape and dtype (H_SHAPE, H_DTYPE) at the EP sizes
  # H_EPS (default "8 2"), each aligned sweep under H_TO seconds (session 18: qwen3 bf16's ~52 s each, FP8's ~125 s
  # with 30 compile jobs; the TMA / Gluon runs ~22 s each). One EP size alone may take H_TO=400
  for ep in ${H_EPS:-8 2}; do
    timeout ${H_TO:-200} python3 benchmarks/tune_moe.py --ep $ep --shapes ${H_SHAPE:-qwen3} --dtypes ${H_DTYPE:-bf16} \
      --m 1,4,16,64,256,1024,4096 --jobs 30 --out $OUT/ep$ep 2>&1 | grep -E "^best|wrote|summary|Error" | cut -c1-160
  done
  # the TMA runs extend the tables above (copied into this machine's kernels/configs only; they refuse without them)
  cp $OUT/ep*/configs/*.json kernels/configs/ 2>/dev/null
  for ep in ${H_EPS:-8 2}; do
    timeout 60 python3 benchmarks/tune_moe.py --tma --ep $ep --shapes ${H_SHAPE:-qwen3} --dtypes ${H_DTYPE:-bf16} \
      --m 1024,4096 --jobs 30 --out $OUT/ep$ep 2>&1 | grep -E "^moe_tma|summary|Error|refuse|no table" | cut -c1-400
  done
  echo "EP tables (copy into kernels/configs/ by hand):"; ls -l $OUT/ep*/configs/*.json
  # one file back (the device tool returns a few files at most): tables and the tuners' JSON
  EPD=$(cd $OUT && ls -d ep[0-9]* 2>/dev/null)  # the EP sizes this call ran
  [ -n "$EPD" ] && tar czf $OUT/phase_h.tgz -C $OUT $EPD && rm -rf $OUT/ep[0-9]*
fi
if [[ $PHASES == *I* ]]; then  # issue 17: the FP8-KV decode's tensor-core tiles with deeper K/V rings (BLOCK_N 64,
  # stages 4 / 5: tune_attention.py DECODE_TILES_FP8_DOT) against the table's, every FP8 decode case (B=1 4k / 32k / 128k,
  # B=16 / 64 at 4k); where a new tile wins B=1 32k, copy $OUT/attn/configs' attention table in and run phase U (the
  # served 32k step) to confirm
  timeout 420 python3 benchmarks/tune_attention.py --only decode --kv-dtypes fp8 --fp8-dot-only --budget-s 330 \
    --out $OUT/attn 2>&1 | grep -vE "^\s*$" | tail -40
fi
if [[ $PHASES == *O* ]]; then  # issue 16: causal prefill attention timed from CUDA graphs (bench_attention timed it
  # eagerly until session 18: the 1k row read the host's ~70 us launch, 0.17 of the matmul rate, where the tuner's
  # graph replays timed 0.35-0.38, SDPA's rate). Triton (tile dict 0) and the Gluon split_wg 1 tile at every length,
  # SDPA beside (the first CUDA-graph capture of the Gluon attention kernel: a failing one is timed eagerly).
  # GLUON_MIN_Q decides eager steps only (more than 2048 tokens, --enforce-eager): the mixed graphs run the Triton
  # kernel's tile-map grid, which the Gluon kernel refuses
  timeout 300 python3 benchmarks/bench_attention.py --ctxs "" --out $OUT/attn_graph \
    --gluon '[0, {"num_stages": 3, "split_wg": 1}]' 2>&1 | grep -E "prefill|summary|Error|timing failed" | cut -c1-300
fi
if [[ $PHASES == *N* ]]; then  # issue 16: MoE align, the default plan ("auto": sort from 8192 pairs, session 17)
  # a line per M (exact=True: every column bit-equal to moe_align_ref): the default (two_launches; scan / noscan),
  # "pairwise" where the default sorts, pairwise at chunk 256, the sort rank at its chunk rule (sort), at chunks
  # 256..1024 (sort_c*) and in one program up to 1024 pairs; the summary names each M's fastest. 256 / 512 tokens
  # (2048 / 4096 pairs) are new: if a sort column beats two_launches there, lower SORT_FROM_PAIRS (kernels/moe_align.py;
  # test_align_plan_sort_rank's warmup check must still pass). 1536 / 3072 tokens: 48 chunks, where the SCAN (from 33
  # chunks, session 18) is unmeasured; if its column loses to noscan there, raise SCAN_CHUNKS
  for e in 128 160; do
    timeout 130 python3 benchmarks/bench_align.py --experts $e --m 16,64,256,512,1024,1536,2048,3072,4096,8192 --chunks 256 \
      --sort-chunks 256,512,1024 --sort-one-program 1024 --out $OUT/align_sort_e$e.json 2>&1 | tail -11
  done
fi
if [[ $PHASES == *Z* ]]; then  # issue 17: the decode config's early_inputs (step inputs before the PDL wait), off / on
  # in steps, FP8 KV (session 20: set in the H200 table's FP8 small-batch config from these rows), and the kernel
  # rows at both model shapes; then what plain reads of the same bytes reach (bench_decode_floor.py)
  for k in 0 1 0 1; do
    timeout 110 python3 benchmarks/decode_knobs.py early_inputs=$k benchmarks/bench_e2e.py --no-hf --batch-sizes 1 \
      --ctx 32768 --prefill 8192 --steps 30 --async-scheduling --kv-cache-dtype fp8 --out $OUT/e2e_32k_early$k.json \
      2>&1 | grep -E "^ours decode|Error|Traceback" | sed "s/^/early_inputs=$k 32k fp8kv: /"
  done
  for shape in qwen3-30b-a3b glm-4.5-air; do
    for k in 0 1; do
      timeout 70 python3 benchmarks/decode_knobs.py early_inputs=$k benchmarks/bench_attention.py --shape $shape \
        --batches 1 --ctxs 4096,32768,131072 --kv-dtypes fp8 --no-prefill --out $OUT/attn_${shape}_early$k 2>&1 \
        | grep -E "attn decode|Error" | sed "s/^/$shape early_inputs=$k: /"
    done
  done
  timeout 100 python3 benchmarks/bench_decode_floor.py --out $OUT/floor.json 2>&1 | grep -E "floor|copy|Error"
fi
if [[ $PHASES == *Y* ]]; then  # issue 17: the decode merge, a second launch (the default) vs the last split merging in
  # the same launch (fused: one program per sequence and KV head reads every split's partials), first the kernels
  # alone (bench_attention rows, both merges, B=1 at the split counts of 1k..128k: 8 splits at 1k, 64 from 8k), then
  # in steps: the table's configs with fused_merge_max_splits=64 (decode_knobs.py: every split count fuses) against
  # without, B=1 at ctx 1k bf16 with graphs sized as served (--max-model-len 40960: 64 splits whatever the context,
  # so the fused merge reads 64 splits' partials where 8 hold tokens) and at 32k FP8 KV. If fused wins, set the knob
  # in the H200 table's small-batch decode configs; if it wins at 1k alone, a merge bounded by the splits that hold
  # tokens comes first (the knob decides from the static split count, which served graphs fix at 64)
  timeout 80 python3 benchmarks/bench_attention.py --batches 1 --ctxs 1024,4096,32768,131072 --kv-dtypes fp8,bf16 \
    --no-prefill --decode-merge separate,fused --out $OUT/merge_qwen3 2>&1 | grep -E "decode|Error"
  for knobs in "" fused_merge_max_splits=64; do
    RUN=(python3); [ -n "$knobs" ] && RUN=(python3 benchmarks/decode_knobs.py $knobs)
    timeout 100 "${RUN[@]}" benchmarks/bench_e2e.py --no-hf --batch-sizes 1 --prefill 1024 --async-scheduling \
      --max-model-len 40960 --steps 30 --out $OUT/e2e_merge${knobs:+_fused}.json 2>&1 \
      | grep -E "^ours decode|Error|Traceback" \
      | sed "s/^/merge ${knobs:-separate}: /"
    timeout 120 "${RUN[@]}" benchmarks/bench_e2e.py --no-hf --batch-sizes 1 --ctx 32768 --prefill 8192 --steps 20 \
      --kv-cache-dtype fp8 --out $OUT/e2e_32k_merge${knobs:+_fused}.json 2>&1 | grep -E "^ours decode|Error|Traceback" \
      | sed "s/^/merge ${knobs:-separate} 32k fp8: /"
  done
fi
echo "done in $SECONDS s"
