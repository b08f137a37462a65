"""The top-k sum of the MoE layer: each token's weighted per-slot outputs y [pairs, N] summed into [tokens, N].

A separate launch (_moe_sum_kernel), or, at one token, inside the down GEMM (_one_token_sum: the last slot to
finish a column tile sums it; used by kernels/fused_moe.py and kernels/moe_gemv.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import zeroed_counters
from kernels.pdl import pdl_release, pdl_wait


@triton.jit
def _one_token_sum(y_ptr, ids_ptr, sum_ptr, counter_ptr, pid_n, offs_n, nmask, num_handled, N,
                   TOP_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # FUSED_SUM (one token): the last of the token's handled slots to finish column tile pid_n sums the
    # token's y rows into sum_ptr, in the order and precision of _moe_sum_kernel, and re-arms the counter
    tl.debug_barrier()  # every thread's y stores precede the counter's release
    counter = counter_ptr + pid_n
    if tl.atomic_add(counter, 1, sem="acq_rel") == num_handled - 1:
        acc = tl.zeros([BLOCK_N], tl.float32)
        for k in tl.static_range(TOP_K):
            handled = tl.load(ids_ptr + k) >= 0
            # .cg: the other slots' rows were written by other SMs, never through this SM's L1
            y = tl.load(y_ptr + k * N + offs_n, mask=nmask & handled, other=0.0, cache_modifier=".cg")
            acc += y.to(tl.float32)
        tl.store(sum_ptr + offs_n, acc.to(sum_ptr.dtype.element_ty), mask=nmask)
        tl.atomic_xchg(counter, 0)  # ready for the next launch (CUDA graph replays reuse the buffer)


@triton.jit
def _moe_sum_kernel(
    y_ptr, ids_ptr, out_ptr, N, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False,
):
    # out[t] = sum over the token's handled slots (id >= 0) of y[t * TOP_K + k]; y [pairs, N]
    pdl_wait(PDL)  # y is the down GEMM's output (kernels/pdl.py)
    pdl_release(PDL)
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k in tl.static_range(TOP_K):
        handled = tl.load(ids_ptr + t * TOP_K + k) >= 0
        acc += tl.load(y_ptr + (t * TOP_K + k) * N + n, mask=nmask & handled, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * N + n, acc.to(out_ptr.dtype.element_ty), mask=nmask)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _sum_counters(n: int, device: torch.device) -> torch.Tensor:
    return zeroed_counters(_COUNTERS, n, device, 1024)  # the fused top-k sum's arrivals per column tile
