"""FP8 (e4m3) with fp32 block scales, in the HF layout.

Weights [N, K] (or [E, N, K]) carry weight_scale_inv [ceil(N/128), ceil(K/128)]: w = q * scale_inv per
[128, 128] block. Activations are quantized on the fly per token and 128 channels: x [M, K] ->
q [M, K] e4m3 and scale [M, ceil(K/128)] fp32. fp8_linear multiplies the two on the tensor cores with the
scales applied per 128-wide K step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

FP8_BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
_MIN_SCALE = 1e-12  # an all-zero group still gets a finite, positive scale


def quantize_weight_block(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (q [..., N, K] e4m3, scale_inv [..., ceil(N/block), ceil(K/block)] fp32)."""
    *lead, n, k = w.shape
    nb, kb = triton.cdiv(n, block), triton.cdiv(k, block)
    wp = F.pad(w.float(), (0, kb * block - k, 0, nb * block - n)).view(*lead, nb, block, kb, block)
    scale = (wp.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp_min(_MIN_SCALE)  # [..., nb, kb]
    q = (wp / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(*lead, nb * block, kb * block)[..., :n, :k].contiguous(), scale


def dequantize_weight_block(
    q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, block: int = FP8_BLOCK
) -> torch.Tensor:
    n, k = q.shape[-2:]
    s = scale_inv.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :n, :k]
    return (q.float() * s).to(dtype)


def per_token_group_quant_ref(x: torch.Tensor, group: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] -> (q [..., K] e4m3, scale [..., ceil(K/group)] fp32), x ~ q * scale per group."""
    k = x.shape[-1]
    kg = triton.cdiv(k, group)
    xg = F.pad(x.float(), (0, kg * group - k)).view(*x.shape[:-1], kg, group)
    scale = (xg.abs().amax(dim=-1) / FP8_MAX).clamp_min(_MIN_SCALE)
    q = (xg / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(*x.shape[:-1], kg * group)[..., :k].contiguous(), scale


@triton.jit(do_not_specialize=["num_rows"])  # one variant for every step size
def _group_quant_kernel(
    x_ptr, q_ptr, s_ptr, num_rows, K, stride_x, stride_q, stride_s,
    NUM_GROUPS: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, FP8_MAX_C: tl.constexpr,
    MIN_SCALE: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < num_rows
    r64 = r.to(tl.int64)
    for g in range(NUM_GROUPS):
        c = g * GROUP + tl.arange(0, GROUP)
        mask = rmask[:, None] & (c < K)[None, :]
        x = tl.load(x_ptr + r64[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), 1) / FP8_MAX_C, MIN_SCALE)  # [BLOCK_R]
        q = tl.clamp(x / scale[:, None], -FP8_MAX_C, FP8_MAX_C)
        tl.store(q_ptr + r64[:, None] * stride_q + c[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + r64 * stride_s + g, scale, mask=rmask)


def per_token_group_quant(x: torch.Tensor, group: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    if x.stride(-1) != 1 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"per_token_group_quant needs a float tensor with contiguous rows, got {x.dtype}")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    kg = triton.cdiv(k, group)
    q = torch.empty(rows, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(rows, kg, dtype=torch.float32, device=x.device)
    if rows:
        block_r = 16
        _group_quant_kernel[(triton.cdiv(rows, block_r),)](
            x2, q, s, rows, k, x2.stride(0), q.stride(0), s.stride(0),
            NUM_GROUPS=kg, GROUP=group, BLOCK_R=block_r, FP8_MAX_C=FP8_MAX, MIN_SCALE=_MIN_SCALE, num_warps=4,
        )
    return q.view(*x.shape), s.view(*x.shape[:-1], kg)


def fp8_linear_ref(
    x: torch.Tensor,  # [M, K] bf16/fp16/fp32
    weight: torch.Tensor,  # [N, K] e4m3
    weight_scale_inv: torch.Tensor,  # [ceil(N/128), ceil(K/128)] fp32
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ dequant(weight).T with x rounded through the same per-token-group FP8 quantization; [M, N]."""
    q, s = per_token_group_quant_ref(x)
    xq = q.float() * s.repeat_interleave(FP8_BLOCK, dim=-1)[..., : x.shape[-1]]
    y = xq @ dequantize_weight_block(weight, weight_scale_inv, torch.float32).t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K,
    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # c[m, n] = sum over 128-wide K groups g of (a_q[m, g] . b_q[n, g]) * a_scale[m, g] * b_scale[n // 128, g]
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    nmask = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm
    bs_ptrs = bs_ptr + (offs_n // 128) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        a_s = tl.load(as_ptrs + k0 // 128, mask=mmask, other=0.0)
        b_s = tl.load(bs_ptrs + k0 // 128, mask=nmask, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def fp8_linear(
    x: torch.Tensor,  # [M, K] bf16/fp16/fp32
    weight: torch.Tensor,  # [N, K] e4m3
    weight_scale_inv: torch.Tensor,  # [ceil(N/128), ceil(K/128)] fp32
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    n, k = weight.shape
    if x.shape[-1] != k or weight.dtype != FP8_DTYPE or not weight.is_contiguous():
        raise ValueError(f"fp8_linear: x {tuple(x.shape)} vs contiguous e4m3 weight {tuple(weight.shape)} "
                         f"({weight.dtype})")
    if tuple(weight_scale_inv.shape) != (triton.cdiv(n, FP8_BLOCK), triton.cdiv(k, FP8_BLOCK)) \
            or weight_scale_inv.dtype != torch.float32 or not weight_scale_inv.is_contiguous():
        raise ValueError(f"weight_scale_inv must be contiguous fp32 [{triton.cdiv(n, FP8_BLOCK)}, "
                         f"{triton.cdiv(k, FP8_BLOCK)}], got {tuple(weight_scale_inv.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    a, a_s = per_token_group_quant(x.reshape(-1, k))
    m = a.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
        bn = 64 if m <= 64 else 128
        _fp8_gemm_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
            a, a_s, weight, weight_scale_inv, bias if bias is not None else out, out, m, n, k,
            a.stride(0), a_s.stride(0), weight.stride(0), weight_scale_inv.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8,
            num_warps=4 if bm <= 64 else 8, num_stages=4 if bm <= 64 else 3,
        )
    return out.view(*lead, n)
