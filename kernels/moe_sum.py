"""The top-k sum of the MoE layer: each token's weighted per-slot outputs y [pairs, N] summed into [tokens, N].

A separate launch (_moe_sum_kernel), or, at one token, inside the down GEMM (_one_token_sum: the last slot to
finish a column tile sums it; used by kernels/fused_moe.py and kernels/moe_gemv.py), or inside the next RMSNorm:
fused_experts(defer_sum=True) returns the un-summed TopKSlots and kernels/norm.py rms_norm sums them with
_slots_sum, the same fp32 adds in the same slot order as _moe_sum_kernel, in its own launch (the sum, the residual
add and the norm: one kernel instead of two at the end of every MoE layer).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from kernels import zeroed_counters
from kernels.pdl import launch_kwargs, pdl_enabled, pdl_release, pdl_wait


@dataclass(frozen=True)
class TopKSlots:
    """A MoE layer's output with its top-k sum left to the consumer: row t of the sum is the fp32 sum, in slot
    order, of y[t * top_k + k] over the handled slots k (topk_ids[t, k] >= 0), rounded to y's dtype; then extra[t]
    is added in fp32 and rounded again, as the torch add `routed + shared` does."""

    y: torch.Tensor  # [num_tokens * top_k, hidden] weighted per-slot outputs; rows of unhandled slots never read
    topk_ids: torch.Tensor  # [num_tokens, top_k] int32 / int64, -1 = slot not handled here
    extra: torch.Tensor | None = None  # [num_tokens, hidden], y's dtype: the shared experts' output

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def hidden(self) -> int:
        return self.y.shape[1]

    def with_extra(self, extra: torch.Tensor) -> TopKSlots:
        if self.extra is not None:
            raise ValueError("these top-k slots already carry an extra term")
        return replace(self, extra=extra)

    def check(self) -> None:
        y, ids, extra = self.y, self.topk_ids, self.extra
        if ids.dim() != 2 or ids.shape[1] < 1 or ids.dtype not in (torch.int32, torch.int64) \
                or not ids.is_contiguous():
            raise ValueError(f"topk_ids must be a contiguous int32/int64 [tokens, top_k >= 1], got {tuple(ids.shape)} "
                             f"{ids.dtype}")
        if y.dim() != 2 or y.shape[0] != ids.numel() or y.stride(1) != 1:
            raise ValueError(f"y {tuple(y.shape)} must be [tokens * top_k = {ids.numel()}, hidden] with contiguous "
                             f"rows")
        if extra is not None and (extra.shape != (ids.shape[0], y.shape[1]) or extra.stride(1) != 1
                                  or extra.dtype != y.dtype):
            raise ValueError(f"extra {tuple(extra.shape)} {extra.dtype} must be [{ids.shape[0]}, {y.shape[1]}] "
                             f"{y.dtype} with contiguous rows")

    def sum(self) -> torch.Tensor:
        return moe_sum(self)


def moe_sum_ref(slots: TopKSlots) -> torch.Tensor:
    """[num_tokens, hidden] in y's dtype: the sum TopKSlots defines, in torch."""
    slots.check()
    num_tokens, top_k = slots.topk_ids.shape
    y = slots.y.view(num_tokens, top_k, -1).float()
    handled = slots.topk_ids >= 0
    acc = torch.zeros(num_tokens, slots.hidden, dtype=torch.float32, device=y.device)
    for k in range(top_k):  # slot order; an unhandled slot's row may hold anything (NaN): selected out, not scaled
        acc += torch.where(handled[:, k, None], y[:, k], 0.0)
    out = acc.to(slots.y.dtype)
    if slots.extra is not None:
        out = (out.float() + slots.extra.float()).to(out.dtype)
    return out


@triton.jit
def _slots_sum(y_ptr, ids_ptr, offs, mask, stride_y, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
               LOAD_ALL: tl.constexpr = False):
    # fp32 [BLOCK]: sum over one token's handled slots of y[k, offs], in slot order, not yet rounded; y_ptr and
    # ids_ptr point at the token's first slot row / id. LOAD_ALL: every slot's row is loaded (in bounds: y has a
    # row per slot) and an unhandled one's values replaced by the 0.0 the masked load gives, so the row loads need
    # not wait for the ids (one memory round trip less; worth it where nearly every slot is handled: no EP)
    acc = tl.zeros([BLOCK], tl.float32)
    for k in tl.static_range(TOP_K):
        handled = tl.load(ids_ptr + k) >= 0
        if LOAD_ALL:
            y = tl.load(y_ptr + k * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
            acc += tl.where(handled, y, 0.0)  # (an unwritten row may hold NaN: selected out, never scaled)
        else:
            acc += tl.load(y_ptr + k * stride_y + offs, mask=mask & handled, other=0.0).to(tl.float32)
    return acc


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
    acc = _slots_sum(y_ptr + t * TOP_K * N, ids_ptr + t * TOP_K, n, nmask, N, TOP_K, BLOCK_N)
    tl.store(out_ptr + t * N + n, acc.to(out_ptr.dtype.element_ty), mask=nmask)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _sum_counters(n: int, device: torch.device) -> torch.Tensor:
    return zeroed_counters(_COUNTERS, n, device, 1024)  # the fused top-k sum's arrivals per column tile


def moe_sum(slots: TopKSlots, out: torch.Tensor | None = None, pdl: bool | None = None) -> torch.Tensor:
    """The sum TopKSlots defines, [num_tokens, hidden] in y's dtype (the MoE layer's output as it is today), into
    out (contiguous [num_tokens, hidden], y's dtype) when given: the experts' own separate top-k sum launch, with
    their PDL choice (None: the global switch)."""
    slots.check()
    num_tokens, top_k = slots.topk_ids.shape
    y, h = slots.y, slots.hidden
    if y.stride(0) != h:
        raise ValueError(f"moe_sum needs contiguous y rows of {h}, got stride {y.stride(0)}")
    if out is None:
        out = torch.empty(num_tokens, h, dtype=y.dtype, device=y.device)
    if num_tokens:
        block_n = min(1024, triton.next_power_of_2(h))
        pdl = pdl_enabled(y.device) if pdl is None else pdl
        _moe_sum_kernel[(num_tokens, triton.cdiv(h, block_n))](y, slots.topk_ids, out, h, TOP_K=top_k,
                                                               BLOCK_N=block_n, PDL=pdl, **launch_kwargs(pdl))
    if slots.extra is not None:
        out = out + slots.extra  # as the MoE block adds its shared experts
    return out
