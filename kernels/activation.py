"""SiLU-and-mul: the gated activation of the dense MLPs (the MoE kernels fuse their own)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x [num_tokens, 2 * inter] (gate then up) -> silu(gate) * up, [num_tokens, inter]."""
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, INTER, stride_x, stride_o, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < INTER
    gate = tl.load(x_ptr + t * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_x + INTER + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + c, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"silu_and_mul needs x [tokens, 2 * inter] with contiguous rows, got {tuple(x.shape)}")
    num_tokens, two_inter = x.shape
    inter = two_inter // 2
    out = torch.empty(num_tokens, inter, dtype=x.dtype, device=x.device)
    if num_tokens:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            x, out, inter, x.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out
