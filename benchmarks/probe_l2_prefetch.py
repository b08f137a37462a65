"""Probe: the M=1 dense GEMV with its weight cold, prefetched into L2 shortly before, or hot (session 8, issue 16).

  PYTHONPATH=. python3 benchmarks/probe_l2_prefetch.py          (a GPU; ~15 s)

Cold: L2 flushed by a 512 MB write. Prefetched: a separate kernel hands the weight to the sm90 bulk-copy engine
(cp.async.bulk.prefetch.L2, kernels/moe_gemv.py _prefetch_l2), then a ~5-10 us sleep kernel, then the GEMV. Hot:
the same GEMV ran just before. One CUDA-event-timed call per rep, median. If hot is far above the HBM floor, the
kernel is latency-bound and prefetching its weights during attention cannot bring it to the floor.
"""

from __future__ import annotations

import statistics

import torch
import triton
import triton.language as tl

from kernels.linear import gemv as linear_gemv
from kernels.moe_gemv import _prefetch_l2

COPY_TBPS = 4.24  # an H200's measured copy bandwidth (benchmarks/RESULTS.md)


@triton.jit
def _prefetch_kernel(ptr, nbytes, PIECES: tl.constexpr):
    pid = tl.program_id(0)
    share = tl.cdiv(nbytes, tl.num_programs(0) * 16) * 16
    start = pid * share
    _prefetch_l2(ptr.to(tl.pointer_type(tl.int8)) + start, tl.maximum(tl.minimum(share, nbytes - start), 0), PIECES)


def time_case(case: str, n: int, k: int, flush: torch.Tensor, programs: int = 132, sleep_cycles: int = 20000,
              reps: int = 40) -> float:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    cfg = linear_gemv.dispatch_config(x, w)  # the model's choice: the GEMV where the table has it, else cuBLAS

    def call() -> torch.Tensor:
        return linear_gemv.gemv_linear(x, w, None, cfg) if cfg else torch.nn.functional.linear(x, w)

    call()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.fill_(1)
        if case == "prefetched":
            _prefetch_kernel[(programs,)](w, w.numel() * w.element_size(), PIECES=128, num_warps=4)
        elif case == "hot":
            call()
        torch.cuda._sleep(sleep_cycles)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> None:
    flush = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    for n, k, name in [(2048, 4096, "o_proj"), (5120, 2048, "qkv")]:
        res = {case: time_case(case, n, k, flush) for case in ("cold", "prefetched", "hot")}
        floor = n * k * 2 / (COPY_TBPS * 1e12) * 1e6
        print(f"{name} [{n},{k}]: " + " ".join(f"{c} {t:.2f} us" for c, t in res.items()) + f", floor {floor:.2f} us")
        for programs in (33, 66, 264):
            print(f"  prefetched by {programs} programs: {time_case('prefetched', n, k, flush, programs):.2f} us")
        print(f"  prefetched, ~5 us ahead: {time_case('prefetched', n, k, flush, sleep_cycles=10000):.2f} us")


if __name__ == "__main__":
    main()
