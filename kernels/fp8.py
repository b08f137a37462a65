"""FP8 (e4m3) with fp32 block scales, in the HF layout.

Weights [N, K] (or [E, N, K]) carry weight_scale_inv [ceil(N/128), ceil(K/128)]: w = q * scale_inv per
[128, 128] block. Activations are quantized on the fly per token and 128 channels: x [M, K] ->
q [M, K] e4m3 and scale [M, ceil(K/128)] fp32.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.pdl import launch_kwargs, pdl_enabled, pdl_release, pdl_wait

FP8_BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
_MIN_SCALE = 1e-12  # an all-zero group still gets a finite, positive scale


@triton.jit
def widen_e4m3(x):
    # e4m3 -> fp16 (exact; sm89+ PTX), two values per instruction as in Triton's own cast, four per asm instance (one
    # 32-bit register of bytes, no byte shuffles). Impure, so that Triton cannot hoist a dot operand's layout change
    # above it: the change then moves fp16 (ldmatrix) instead of gathering single FP8 bytes from shared memory (the
    # attention's V tile: LDS.U8 per value; compiled for sm90 at BLOCK_N 64 / 128: 1528 / 2048 SASS instructions ->
    # 1024 / 1312, 147 / 198 registers -> 106 / 186, at the cost of a 16-bit staging tile in shared memory).
    # Used where native_e4m3_cvt says so (kernels/attention/fp8_dot.py, kernels/linear/gemv.py)
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
        "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4)


@triton.jit
def f16_pow2_split(x):
    # x [R, C] float -> (x16 [R, C] fp16, s [R] fp32) with x = x16 * s[:, None]: each row is scaled by the power of two
    # that puts its largest magnitude in [2^13, 2^14). Only exponents change, so a 16-bit row is exact in fp16 whatever
    # its range (bf16 activations beyond fp16's 65504 can feed an fp16 MMA), down to 2^-30 (bf16) / 2^-27 (fp16) of
    # the row max: smaller ones lose low bits in fp16's subnormals (tests/test_kernels_moe_w8.py; fp32 rows round).
    # The exponent is clamped below at -113 so that s is normal (a zero or subnormal row would get s = 0, 1 / s = inf;
    # a row below 2^-113 scales to < 2^13) and above at 126 (a row above 2^126 scales to < 2^15); inf / nan stay so
    amax = tl.max(tl.abs(x.to(tl.float32)), 1)
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent of the row max
    e = tl.minimum(tl.maximum(e, 14), 253)
    s = ((e - 13) << 23).to(tl.float32, bitcast=True)  # 2^(E - 13), E = e - 127
    inv = ((267 - e) << 23).to(tl.float32, bitcast=True)  # 2^(13 - E)
    return (x.to(tl.float32) * inv[:, None]).to(tl.float16), s


@functools.lru_cache(maxsize=8)
def native_e4m3_cvt(device: torch.device) -> bool:
    """Whether widen_e4m3's PTX runs here: cvt.*.e4m3x2 is sm89+, and the interpreter runs no PTX (Triton's cast
    there, the same values)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


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


# one variant for every step size (stride_sg: the group-major scales' row count, padded: see per_token_group_quant)
@triton.jit(do_not_specialize=["num_rows", "stride_sg"])
def _group_quant_kernel(
    x_ptr, q_ptr, s_ptr, num_rows, K, stride_x, stride_q, stride_s, stride_sg,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, FP8_MAX_C: tl.constexpr, MIN_SCALE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # program (r, g): rows [r * BLOCK_R, +BLOCK_R) x columns [g * GROUP, +GROUP), every group in parallel (a loop
    # over the groups in one program per row block ran them one after another, each load waiting on memory)
    pdl_wait(PDL)  # x is the previous kernel's output (kernels/pdl.py)
    pdl_release(PDL)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g = tl.program_id(1)
    rmask = r < num_rows
    r64 = r.to(tl.int64)
    c = g * GROUP + tl.arange(0, GROUP)
    mask = rmask[:, None] & (c < K)[None, :]
    x = tl.load(x_ptr + r64[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 1) / FP8_MAX_C, MIN_SCALE)  # [BLOCK_R]
    q = tl.clamp(x / scale[:, None], -FP8_MAX_C, FP8_MAX_C)
    tl.store(q_ptr + r64[:, None] * stride_q + c[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + r64 * stride_s + g * stride_sg, scale, mask=rmask)


def per_token_group_quant(x: torch.Tensor, group: int = FP8_BLOCK, group_major: bool = False,
                          row_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    # group_major: the scales [rows, K/group] stored group by group (strides (1, rows)), as cuBLAS's block-scaled
    # GEMM reads them (kernels/linear/w8a8.py); 2-D x only. row_multiple: q and the scales get rows rounded up to a
    # multiple of it, the pad rows left unwritten (cuBLAS wants the scales' leading dimension a multiple of 4)
    if (group_major or row_multiple > 1) and x.dim() != 2:
        raise ValueError(f"per_token_group_quant: group_major / row_multiple take 2-D x, got {list(x.shape)}")
    if x.stride(-1) != 1 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"per_token_group_quant needs a float tensor with contiguous rows, got {x.dtype}")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    padded = -(-rows // row_multiple) * row_multiple
    kg = triton.cdiv(k, group)
    q = torch.empty(padded, k, dtype=FP8_DTYPE, device=x.device)
    if group_major:
        s = torch.empty_strided((padded, kg), (1, max(padded, 1)), dtype=torch.float32, device=x.device)
    else:
        s = torch.empty(padded, kg, dtype=torch.float32, device=x.device)
    if rows:
        block_r = 16
        pdl = pdl_enabled(x.device)
        _group_quant_kernel[(triton.cdiv(rows, block_r), kg)](
            x2, q, s, rows, k, x2.stride(0), q.stride(0), s.stride(0), s.stride(1),
            GROUP=group, BLOCK_R=block_r, FP8_MAX_C=FP8_MAX, MIN_SCALE=_MIN_SCALE, PDL=pdl, num_warps=4,
            **launch_kwargs(pdl),
        )
    if padded != rows or group_major:
        return q, s
    return q.view(*x.shape), s.view(*x.shape[:-1], kg)
