#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (or -x4 / -x8: one rank per visible GPU), issue 18 item 3: the expert all2all
# across real NCCL ranks (the engine's sparse backend in its static and exact-rows modes, FP8 dispatch, allgather,
# plain all_to_all_single of the same bytes, --check on), first eager only, then again with the CUDA-graph replays
# (if a capture went wrong, the eager table is already saved); then the coordinator's cost per step with 2, 4 and
# 8 rank processes (CPU only; the GPU host has more cores than the dev box). Logs and JSON under $OUT. ~3 minutes.
# A2A_EXTRA / COORD_EXTRA: flags appended (they win), e.g. a CPU dry run:
#   NPROC=2 A2A_EXTRA="--device cpu --hidden 64 --experts 8 --tokens 1,8 --reps 2" COORD_EXTRA="--steps 20" bash ...
set -uo pipefail
python3 -m pip install -q --no-index --find-links .wheelhouse msgspec pyzmq setproctitle 2>&1 | tail -1
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
N=${NPROC:-$(nvidia-smi -L | wc -l)}
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
a2a() {  # $1: tag, then flags
  local tag=$1; shift
  timeout 200 python3 -m torch.distributed.run --nproc-per-node "$N" benchmarks/bench_all2all_dist.py --check \
    --timeout-s 150 --out "$OUT/all2all_dist_x${N}_$tag.json" "$@" ${A2A_EXTRA:-} 2>&1 | tee "$OUT/all2all_dist_x${N}_$tag.log" \
    | grep -vE "^(W|\*)" | tail -40
  echo "all2all $tag done at ${SECONDS} s"
}
a2a eager --no-graphs --host-cost --backends sparse,sparse_exact,sparse_fp8,allgather --tokens 1,8,64,256,1024,2048,4096
a2a graphs --backends sparse,sparse_fp8,allgather --tokens 1,8,64,256,1024,2048
timeout 200 python3 benchmarks/bench_coordinator_ranks.py --ranks 2,4,8 --work-us 0,5000 \
  --out "$OUT/coordinator_ranks.json" ${COORD_EXTRA:-} 2>&1 | tee "$OUT/coordinator_ranks.log" | tail -20
echo "coordinator done at ${SECONDS} s"
