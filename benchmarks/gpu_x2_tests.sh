#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issue 18, item 1): the 2-GPU tests — NCCL DP=2/EP=2 with the sparse all2all
# inside the decode CUDA graphs (tests/test_gpu_all2all.py), an idle rank's dummy graphs against a busy rank's
# (test_dummy_step), TP=2 with graphs vs transformers (test_tensor_parallel), the FP8 linears on the GPU — then the
# all2all across the two GPUs and the coordinator per rank count (benchmarks/gpu_x2_all2all.sh). A rank that hangs
# prints its Python stacks (tests/test_all2all.py spawn_ranks). Logs under $OUT. About 9 minutes.
# (First run on 2026-11-29: every NCCL + graphs test hung in destroy_process_group, pytorch#115388; fixed since by
# resetting the captured graphs first — this run is the confirmation.)
set -uo pipefail
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq fastapi uvicorn prometheus-client openai \
  setproctitle llguidance jsonschema 2>&1 | tail -1
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
for t in tests/test_gpu_all2all.py tests/test_dummy_step.py::test_idle_rank_dummy_graphs_nccl \
    tests/test_tensor_parallel.py::test_tp2_nccl_cuda_graphs_equal_transformers tests/test_fp8_linear_model.py; do
  s=$SECONDS
  timeout ${TEST_S:-130} python3 -m pytest -q -s -m gpu -p no:cacheprovider $t > $OUT/test.log 2>&1
  echo "TEST $t rc=$? in $((SECONDS - s)) s"
  tr '\r' '\n' < $OUT/test.log | grep -vE "Writing model|oading weights|^\s*$" | tail -8 | cut -c1-300
  cp $OUT/test.log "$OUT/test_$(basename ${t%%::*} .py).log"
done
echo "tests done at ${SECONDS} s"
OUT=$OUT timeout $((590 - SECONDS)) bash benchmarks/gpu_x2_all2all.sh
