#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (or -x4 / -x8: one rank per visible GPU), issue 18 item 3: the expert all2all
# across real NCCL ranks (the engine's sparse backend in its static and exact-rows modes, FP8 dispatch, allgather,
# their CUDA-graph replays, plain all_to_all_single of the same bytes, --check on), then the coordinator's cost per step
# with 2, 4 and 8 rank processes (CPU only; the GPU host has more cores than the dev box). Logs and JSON under
# $OUT. About 2-3 minutes.
set -uo pipefail
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq setproctitle 2>&1 | tail -1
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
N=${NPROC:-$(nvidia-smi -L | wc -l)}
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
timeout 300 torchrun --nproc-per-node "$N" benchmarks/bench_all2all_dist.py --backends sparse,sparse_exact,sparse_fp8,allgather \
  --tokens 1,8,64,256,1024,2048,4096 --check --timeout-s 240 --out "$OUT/all2all_dist_x$N.json" 2>&1 \
  | tee "$OUT/all2all_dist_x$N.log" | grep -vE "^(W|\*)" | tail -40
echo "all2all done at ${SECONDS} s"
timeout 200 python3 benchmarks/bench_coordinator_ranks.py --ranks 2,4,8 --work-us 0,5000 \
  --out "$OUT/coordinator_ranks.json" 2>&1 | tee "$OUT/coordinator_ranks.log" | tail -20
echo "coordinator done at ${SECONDS} s"
