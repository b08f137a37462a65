"""RMSNorm, optionally fused with the residual add, and then optionally with the MoE top-k sum that makes x.

x may be a MoE layer's un-summed output (kernels/moe_sum.py TopKSlots, from fused_experts(defer_sum=True)): the
kernel then sums each token's slots as _moe_sum_kernel does (same fp32 adds, same order, same rounding), adds the
shared experts' output if the slots carry one, then the residual, and normalizes, all in one launch: bit for bit
moe_sum + rms_norm, one kernel fewer at the end of every MoE layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.moe_sum import TopKSlots, _slots_sum, moe_sum_ref
from kernels.pdl import launch_kwargs, pdl_enabled, pdl_release, pdl_wait


def rms_norm_ref(
    x: torch.Tensor | TopKSlots,  # [num_tokens, hidden], or a MoE layer's top-k slots (residual required)
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """With a residual: returns (norm(x + residual), x + residual), as in the HF decoder layers."""
    if isinstance(x, TopKSlots):
        if residual is None:
            raise ValueError("rms_norm of a MoE layer's top-k slots needs the residual they are added to")
        x = moe_sum_ref(x)
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
        residual = x
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return y if residual is None else (y, residual)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, ids_ptr, extra_ptr, N, eps, stride_x, stride_r, stride_o, stride_ro,
    stride_e, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, TOP_K: tl.constexpr = 0,
    HAS_EXTRA: tl.constexpr = False, PDL: tl.constexpr = False,
):
    # TOP_K > 0: x holds TOP_K rows per token, the MoE's per-slot outputs y [tokens * TOP_K, N], and ids_ptr the
    # token's expert ids [tokens, TOP_K] (-1: slot not handled); extra_ptr (HAS_EXTRA) the shared experts' [tokens, N]
    t = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < N
    if PDL:  # the norm weight is no kernel's output: read it while the predecessor drains (kernels/pdl.py)
        w = tl.load(w_ptr + c, mask=mask)
        pdl_wait(PDL)
        pdl_release(PDL)
    if TOP_K > 0:
        # the top-k sum of kernels/moe_sum.py, rounded to the activation dtype as its kernel stores it
        # (without EP every slot but a padding token's is handled here: all rows are loaded, not waiting for ids)
        x = _slots_sum(x_ptr + t * TOP_K * stride_x, ids_ptr + t * TOP_K, c, mask, stride_x, TOP_K, BLOCK, True)
        x = x.to(x_ptr.dtype.element_ty)
        if HAS_EXTRA:  # `routed + shared` as torch adds them: in fp32, rounded
            e = tl.load(extra_ptr + t * stride_e + c, mask=mask, other=0.0)
            x = (x.to(tl.float32) + e.to(tl.float32)).to(x_ptr.dtype.element_ty)
    else:
        x = tl.load(x_ptr + t * stride_x + c, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # the sum is rounded to the activation dtype first, as the HF layers do
        x = (x.to(tl.float32) + tl.load(res_ptr + t * stride_r + c, mask=mask, other=0.0).to(tl.float32))
        x = x.to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + t * stride_ro + c, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
    y = (xf * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
    if not PDL:
        w = tl.load(w_ptr + c, mask=mask)
    y = y * w.to(tl.float32)
    tl.store(out_ptr + t * stride_o + c, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_num_warps(block: int) -> int:
    # the launch's warps for a [block] row: they set the order of the row's fp32 sum of squares, which
    # kernels/router_norm.py replays bit for bit (its norm_layout asks here)
    return min(16, max(1, block // 512))


def rms_norm(
    x: torch.Tensor | TopKSlots,  # [num_tokens, hidden], or a MoE layer's top-k slots (residual required)
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    slots = x if isinstance(x, TopKSlots) else None
    if slots is not None:
        if residual is None:
            raise ValueError("rms_norm of a MoE layer's top-k slots needs the residual they are added to")
        slots.check()
        rows, shape = slots.y, (slots.num_tokens, slots.hidden)  # rows [tokens * top_k, hidden]
    else:
        rows, shape = x, tuple(x.shape)
    if rows.dim() != 2 or rows.stride(1) != 1 or weight.shape != (shape[1],) or not weight.is_contiguous():
        raise ValueError(f"rms_norm needs x [tokens, hidden] with contiguous rows and weight [hidden], got "
                         f"{tuple(rows.shape)} / {tuple(weight.shape)}")
    if residual is not None and (residual.shape != shape or residual.stride(1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} must match x {shape} with contiguous rows")
    num_tokens, hidden = shape
    out = torch.empty(shape, dtype=torch.promote_types(rows.dtype, weight.dtype), device=rows.device)
    res_out = torch.empty(shape, dtype=rows.dtype, device=rows.device) if residual is not None else out
    if num_tokens:
        block = triton.next_power_of_2(hidden)
        res = residual if residual is not None else rows
        ids = slots.topk_ids if slots is not None else rows  # (unused pointers: any tensor)
        extra = slots.extra if slots is not None and slots.extra is not None else rows
        pdl = pdl_enabled(rows.device)
        _rms_norm_kernel[(num_tokens,)](
            rows, res, weight, out, res_out, ids, extra, hidden, eps, rows.stride(0), res.stride(0), out.stride(0),
            res_out.stride(0), extra.stride(0), HAS_RESIDUAL=residual is not None, BLOCK=block,
            TOP_K=slots.topk_ids.shape[1] if slots is not None else 0,
            HAS_EXTRA=slots is not None and slots.extra is not None, PDL=pdl,
            num_warps=rms_norm_num_warps(block), **launch_kwargs(pdl),
        )
    return out if residual is None else (out, res_out)
