"""RMSNorm, optionally fused with the residual add."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import launch_kwargs, pdl_enabled, pdl_release, pdl_wait


def rms_norm_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """With a residual: returns (norm(x + residual), x + residual), as in the HF decoder layers."""
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
        residual = x
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return y if residual is None else (y, residual)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, N, eps, stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
):
    t = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < N
    if PDL:  # the norm weight is no kernel's output: read it while the predecessor drains (kernels/pdl.py)
        w = tl.load(w_ptr + c, mask=mask)
        pdl_wait(PDL)
        pdl_release(PDL)
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


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != (x.shape[1],) or not weight.is_contiguous():
        raise ValueError(f"rms_norm needs x [tokens, hidden] with contiguous rows and weight [hidden], got "
                         f"{tuple(x.shape)} / {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)} with contiguous rows")
    num_tokens, hidden = x.shape
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty_like(x) if residual is not None else out
    if num_tokens:
        block = triton.next_power_of_2(hidden)
        res = residual if residual is not None else x
        pdl = pdl_enabled(x.device)
        _rms_norm_kernel[(num_tokens,)](
            x, res, weight, out, res_out, hidden, eps, x.stride(0), res.stride(0), out.stride(0),
            res_out.stride(0), HAS_RESIDUAL=residual is not None, BLOCK=block, PDL=pdl,
            num_warps=min(16, max(1, block // 512)), **launch_kwargs(pdl),
        )
    return out if residual is None else (out, res_out)
