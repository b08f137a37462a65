"""y = x W^T (+ b) for a few rows: the decode-time projections (qkv, o_proj) of small batches.

At M <= 16 a projection only streams its weight once, so its time is bytes / bandwidth; cuBLAS picks tiles made
for bigger M there (64-wide N tiles, split-K plus a reduce kernel for o_proj: 0.44-0.65 of copy bandwidth on an
H200). Here each program owns BLOCK_N weight rows and walks K once; the grid has enough programs to cover the
SMs and no second kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROWS = 16  # above this, cuBLAS (the GEMM is no longer a pure weight stream)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # out^T: the weight rows are the MMA's M side
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + kk[None, :],
                    mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_ptr + rm[None, :] * stride_xm + kk[:, None],
                    mask=(rm[None, :] < M) & (kk[:, None] < K), other=0.0)  # [BLOCK_K, BLOCK_M]
        acc += tl.dot(w, x)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + rm[None, :] * stride_om + rn[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[None, :] < M) & (rn[:, None] < N))


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; the Triton weight stream when x is [M <= 16, K] with contiguous rows, cuBLAS otherwise."""
    if x.dim() != 2 or x.shape[0] > MAX_ROWS or x.shape[0] == 0 or x.stride(1) != 1 or weight.stride(1) != 1:
        return F.linear(x, weight, bias)
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    # 32 rows per program while that still gives every SM a program, else 16
    block_n = 32 if triton.cdiv(n, 32) >= _num_sms(x.device) else 16
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=256, num_warps=4, num_stages=4,
    )
    return out
