#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issues 16 and 18): the 2-GPU tests (NCCL DP=2/EP=2 with the all2all in CUDA
# graphs, idle-rank dummy graphs, TP=2 with graphs, FP8 linears under TP=2), then two single-GPU tuners side by
# side, one per GPU: the FP8 linear table (GPU 0; the heuristic's benchmark is the earlier call's) and the
# large-M TMA MoE (GPU 1). Everything under $OUT/res.tgz. About 9.5 minutes.
set -uo pipefail
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; R=/tmp/res; mkdir -p $OUT $R/fp8 $R/tma
timeout 190 python3 -m pytest -q -s -m gpu tests/test_gpu_all2all.py tests/test_dummy_step.py::test_idle_rank_dummy_graphs_nccl \
  tests/test_tensor_parallel.py::test_tp2_nccl_cuda_graphs_equal_transformers tests/test_fp8_linear_model.py 2>&1 \
  | tee $R/multi_tests.log | grep -vE "^\s*$" | tail -25
echo "tests done at ${SECONDS} s"
rm -f kernels/configs/fp8_linear_*.json
(export CUDA_VISIBLE_DEVICES=0
 timeout 215 python3 benchmarks/tune_fp8_linear.py --out $R/fp8/tune --budget-s 165 --jobs 12 > $R/fp8/tune.log 2>&1
 cp $R/fp8/tune/configs/fp8_linear_*.json kernels/configs/
 timeout 150 python3 benchmarks/bench_fp8_linear.py --out $R/fp8/tuned --m 1,8,64,256,1024,4096 > $R/fp8/bench_tuned.log 2>&1
) &
CUDA_VISIBLE_DEVICES=1 OUT=$R/tma TEST_S=90 TUNE_S=170 BENCH_S=100 timeout 370 bash benchmarks/gpu_session_moe_tma.sh > $R/tma/run.log 2>&1
wait
echo "tuners done at ${SECONDS} s"
tar czf $OUT/res.tgz -C /tmp res
echo "==== fp8"; tail -27 $R/fp8/bench_tuned.log; echo "==== tma"; tail -20 $R/tma/run.log
