"""Block-scaled FP8 linear (W8A8): y = x W^T with W e4m3 in [128, 128] blocks (HF weight_scale_inv layout).

The activations are quantized on the fly per token and 128 columns (kernels.fp8.per_token_group_quant, dynamic
scales; for few rows the GEMM does it itself on each tile it loads, one launch fewer); the GEMM multiplies e4m3
tiles, scales each 128-wide K step's partial product by a_scale[m, k] * w_scale[n, k] and accumulates in fp32; the
output is in the activations' dtype. N and K must be multiples of 128 (one weight scale per tile and K step); M is
any size: decode (M <= 256) reads half the weight bytes of bf16.
Few rows give few output tiles: the K loop is then split over several programs (fp32 partial sums, one small
reduce launch) so that enough weight bytes are in flight to reach the copy bandwidth.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.fp8 import (
    _MIN_SCALE,
    FP8_BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    dequantize_weight_block,
    per_token_group_quant,
    per_token_group_quant_ref,
)


def _check(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
           bias: torch.Tensor | None) -> tuple[int, int]:
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise ValueError(f"w8a8_block_linear needs a 2-D {FP8_DTYPE} weight, got {weight.dtype} {list(weight.shape)}")
    n, k = weight.shape
    if n % FP8_BLOCK or k % FP8_BLOCK:
        raise ValueError(f"w8a8_block_linear needs N and K in whole {FP8_BLOCK}-blocks, got weight [{n}, {k}]: "
                         f"keep such a layer in 16-bit")
    if x.shape[-1] != k:
        raise ValueError(f"w8a8_block_linear: x has {x.shape[-1]} columns, the weight {k}")
    blocks = (n // FP8_BLOCK, k // FP8_BLOCK)
    if weight_scale_inv.dtype != torch.float32 or tuple(weight_scale_inv.shape) != blocks:
        raise ValueError(f"w8a8_block_linear needs fp32 weight_scale_inv of shape {list(blocks)}, got "
                         f"{weight_scale_inv.dtype} {list(weight_scale_inv.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"w8a8_block_linear: bias of shape {list(bias.shape)}, expected [{n}]")
    return n, k


def w8a8_block_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] float, weight [N, K] e4m3, weight_scale_inv [N/128, K/128] fp32 -> [..., N] in x.dtype."""
    n, k = _check(x, weight, weight_scale_inv, bias)
    q, s = per_token_group_quant_ref(x.reshape(-1, k))  # [M, K] e4m3, [M, K/128]
    a = q.float() * s.repeat_interleave(FP8_BLOCK, dim=-1)
    y = a @ dequantize_weight_block(weight, weight_scale_inv, torch.float32).t()  # [M, N] fp32
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], n)


@triton.jit(do_not_specialize=["M"])  # one variant per (BLOCK_M, BLOCK_N) for every step size
def _w8a8_block_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K, k_blocks_per_split,
    stride_am, stride_asm, stride_wn, stride_wsn, stride_om, stride_osplit,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, QUANT_A: tl.constexpr, FP8_MAX_C: tl.constexpr, MIN_SCALE: tl.constexpr,
):
    # SPLIT_K > 1: program (tile, s) sums K blocks [s * per, (s + 1) * per) into out[s] (fp32 partials).
    # QUANT_A: a is the 16/32-bit input, quantized per row and K step here as per_token_group_quant does (few
    # rows: cheaper than one more launch); else a is e4m3 with a_scale [M, K/128].
    BLOCK_K: tl.constexpr = 128  # one activation / weight scale per K step
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = N // BLOCK_N
    # grouped order: GROUP_M row tiles walk the column tiles together, so a weight tile is reused from L2
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # always < N: N % BLOCK_N == 0
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m64[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] = W^T tile
    as_ptrs = a_scale_ptr + offs_m64 * stride_asm  # [BLOCK_M]
    ws_ptr = w_scale_ptr + (pid_n * BLOCK_N // 128) * stride_wsn  # BLOCK_N divides 128: one scale row per tile
    first_kb = pid_k * k_blocks_per_split
    a_ptrs += first_kb * BLOCK_K
    w_ptrs += first_kb * BLOCK_K
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(first_kb, tl.minimum(first_kb + k_blocks_per_split, K // BLOCK_K)):
        a = tl.load(a_ptrs, mask=mmask[:, None], other=0.0)
        w = tl.load(w_ptrs)
        if QUANT_A:
            a = a.to(tl.float32)
            a_s = tl.maximum(tl.max(tl.abs(a), 1) / FP8_MAX_C, MIN_SCALE)  # [BLOCK_M]
            a = tl.clamp(a / a_s[:, None], -FP8_MAX_C, FP8_MAX_C).to(w.dtype)
        else:
            a_s = tl.load(as_ptrs + kb, mask=mmask, other=0.0)
        w_s = tl.load(ws_ptr + kb)
        acc += tl.dot(a, w) * (a_s[:, None] * w_s)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS and SPLIT_K == 1:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    out_ptrs = out_ptr + pid_k * stride_osplit + offs_m64[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None])


@triton.jit(do_not_specialize=["numel"])
def _split_k_reduce_kernel(part_ptr, bias_ptr, out_ptr, numel, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK: tl.constexpr):
    # out[m, n] = sum_s part[s, m, n] (+ bias[n]), part [SPLIT_K, M, N] fp32 contiguous
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    # the CPU interpreter: a pretend 4-SM device, so that small test shapes take the split-K path too
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _config(m: int, n: int, k: int, num_sms: int) -> dict[str, int]:
    # decode (few rows): narrow column tiles, the weight read once; prefill: square 128 tiles (two K-step loads
    # of 16 KiB each per stage)
    if m <= 64:
        cfg = {"BLOCK_M": max(16, triton.next_power_of_2(m)), "BLOCK_N": 64, "GROUP_M": 1, "num_warps": 4,
               "num_stages": 4, "QUANT_A": 1}
    elif m <= 128:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    # fewer tiles than two waves of programs: split K so ~2 programs per SM keep weight loads in flight
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * (n // cfg["BLOCK_N"])
    k_blocks = k // FP8_BLOCK
    # ... while the fp32 partials (written and read: 8 * split * M * N bytes) stay below the weight's N * K bytes
    split = max(1, min(k_blocks, 16, 2 * num_sms // tiles, k // (8 * m)))
    per = triton.cdiv(k_blocks, split)
    cfg["k_blocks_per_split"], cfg["SPLIT_K"] = per, triton.cdiv(k_blocks, per)  # no empty split
    return cfg


def w8a8_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                      bias: torch.Tensor | None = None, config: dict[str, int] | None = None) -> torch.Tensor:
    # config: the tiling (tests, tuning); by default _config for this shape and device
    n, k = _check(x, weight, weight_scale_inv, bias)
    if weight.stride(-1) != 1 or weight_scale_inv.stride(-1) != 1:
        raise ValueError("w8a8_block_linear needs a weight and weight_scale_inv with contiguous rows")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        cfg = config or _config(m, n, k, _num_sms(x.device))
        quant_a = bool(cfg.get("QUANT_A", 0))
        # [M, K] e4m3, [M, K/128] fp32; or quantized inside the GEMM (x2 and a dummy scale pointer)
        q, s = (x2, x2) if quant_a else per_token_group_quant(x2)
        split = cfg["SPLIT_K"]
        # split K: fp32 partials [SPLIT_K, M, N], summed (+ bias) by one reduce launch
        part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        bias_arg = bias if bias is not None else s
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * (n // cfg["BLOCK_N"]), split)
        _w8a8_block_kernel[grid](
            q, s, weight, weight_scale_inv, bias_arg, part, m, n, k, cfg["k_blocks_per_split"],
            q.stride(0), s.stride(0), weight.stride(0), weight_scale_inv.stride(0), n, m * n,
            HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], GROUP_M=cfg["GROUP_M"],
            SPLIT_K=split, QUANT_A=quant_a, FP8_MAX_C=FP8_MAX, MIN_SCALE=_MIN_SCALE, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
        if split > 1:
            block = 1024
            _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
                part, bias_arg, out, m * n, n, SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block)
    return out.view(*x.shape[:-1], n)
