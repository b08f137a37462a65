"""Triton kernels of the block-scaled FP8 linear (kernels/linear/w8a8.py launches them; its table: w8a8_config.py).

- _w8a8_dot_kernel: the tensor-core GEMM, one [BLOCK_M, BLOCK_N] output tile per program and 128-wide K steps
  (one activation / weight scale each). QUANT_A quantizes the 16/32-bit activations on each tile it loads;
  SWAP_AB computes the tile as W x^T ([BLOCK_N, BLOCK_M]: the weight rows fill the MMA's 64-row side when there
  are only a few tokens).
- _w8a8_dot_tma_kernel: the same GEMM on pre-quantized activations with both operands loaded by TMA (Hopper
  tensor descriptors).
- _w8a8_gemv_kernel: no tensor cores, for a handful of rows: each program streams a [BLOCK_N, 128] weight tile
  per K step, dequantized to fp32 and multiply-reduced against each (quantized) activation row; tl.dot pads the
  rows to 16 and a tile to the MMA shape, this pays only for the weight bytes.
- Split K (SPLIT_MODE 1 / 2): program (tile, s) sums its share of the K blocks into fp32 partials part[s]; either
  one more launch (_split_k_reduce_kernel) adds them up, or the last program of a tile to finish does (an atomic
  counter per tile, left at zero again for the next launch / CUDA graph replay).
The activations of rows the GEMM does not quantize itself come from kernels.fp8.per_token_group_quant (one
program per 16 rows x 128 columns).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.pdl import pdl_release, pdl_wait


@triton.jit
def _epilogue(acc, offs_m64, offs_n, mmask, tile, pid_k, M, N, split_k, bias_ptr, out_ptr, part_ptr, counter_ptr,
              stride_om, HAS_BIAS: tl.constexpr, SPLIT_MODE: tl.constexpr):
    # acc [BLOCK_M, BLOCK_N] fp32 of output rows offs_m64 and columns offs_n
    out_ptrs = out_ptr + offs_m64[:, None] * stride_om + offs_n[None, :]
    if SPLIT_MODE == 0:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None])
    else:
        # partials part [split_k, M, N] fp32
        tile_offs = offs_m64[:, None] * N + offs_n[None, :]
        numel = M.to(tl.int64) * N
        tl.store(part_ptr + pid_k.to(tl.int64) * numel + tile_offs, acc, mask=mmask[:, None])
        if SPLIT_MODE == 2:
            # every thread's partial stores precede the release of the counter; the last split of the tile sums
            tl.debug_barrier()
            if tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel") == split_k - 1:
                # summed in split order, its own share too: the same bits whichever split finished last
                acc = tl.zeros_like(acc)
                for s in range(split_k):
                    acc += tl.load(part_ptr + s * numel + tile_offs, mask=mmask[:, None], other=0.0,
                                   cache_modifier=".cg")
                if HAS_BIAS:
                    acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
                tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None])
                tl.atomic_xchg(counter_ptr + tile, 0)  # ready for the next launch


@triton.jit
def _tile_of(pid, M, N, group_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grouped order: group_m row tiles walk the column tiles together, so a weight tile is reused from L2
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = N // BLOCK_N
    width = group_m * num_pid_n
    first_m = (pid // width) * group_m
    group_rows = tl.minimum(num_pid_m - first_m, group_m)
    return first_m + (pid % width) % group_rows, (pid % width) // group_rows


# one variant for every M and K: the scale strides (K / 128) and the runtime counts are not specialized on
@triton.jit(do_not_specialize=["M", "k_blocks_per_split", "split_k", "group_m", "stride_asm", "stride_wsn"])
def _w8a8_dot_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, part_ptr, counter_ptr, M, N, K, k_blocks_per_split,
    split_k, group_m, stride_am, stride_asm, stride_wn, stride_wsn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_MODE: tl.constexpr,
    QUANT_A: tl.constexpr, SWAP_AB: tl.constexpr, FP8_MAX_C: tl.constexpr, MIN_SCALE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # QUANT_A: a is the 16/32-bit input, quantized per row and K step here as per_token_group_quant does; else a is
    # e4m3 with a_scale [M, K/128]. BLOCK_N > 128 spans several weight-scale rows (a scale vector per K step).
    BLOCK_K: tl.constexpr = 128
    pdl_wait(PDL)  # the activations (and their scales) are this step's: wait first (kernels/pdl.py)
    pdl_release(PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _tile_of(pid, M, N, group_m, BLOCK_M, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # always < N: N % BLOCK_N == 0
    offs_k = tl.arange(0, BLOCK_K)
    first_kb = pid_k * k_blocks_per_split
    if SWAP_AB:  # a^T tile [BLOCK_K, BLOCK_M], weight tile [BLOCK_N, BLOCK_K]
        a_ptrs = a_ptr + offs_m64[None, :] * stride_am + offs_k[:, None] + first_kb * BLOCK_K
        w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] + first_kb * BLOCK_K
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:  # a tile [BLOCK_M, BLOCK_K], W^T tile [BLOCK_K, BLOCK_N]
        a_ptrs = a_ptr + offs_m64[:, None] * stride_am + offs_k[None, :] + first_kb * BLOCK_K
        w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] + first_kb * BLOCK_K
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    as_ptrs = a_scale_ptr + offs_m64 * stride_asm  # [BLOCK_M]
    if BLOCK_N <= 128:  # BLOCK_N divides 128: one weight-scale row per tile
        ws_ptrs = w_scale_ptr + (pid_n * BLOCK_N // 128) * stride_wsn
    else:
        ws_ptrs = w_scale_ptr + (offs_n // 128) * stride_wsn  # [BLOCK_N]
    for kb in range(first_kb, tl.minimum(first_kb + k_blocks_per_split, K // BLOCK_K)):
        w = tl.load(w_ptrs)
        if SWAP_AB:
            a = tl.load(a_ptrs, mask=mmask[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=mmask[:, None], other=0.0)
        if QUANT_A:
            a = a.to(tl.float32)
            a_s = tl.maximum(tl.max(tl.abs(a), 0 if SWAP_AB else 1) / FP8_MAX_C, MIN_SCALE)  # [BLOCK_M]
            if SWAP_AB:
                a = tl.clamp(a / a_s[None, :], -FP8_MAX_C, FP8_MAX_C).to(w.dtype)
            else:
                a = tl.clamp(a / a_s[:, None], -FP8_MAX_C, FP8_MAX_C).to(w.dtype)
        else:
            a_s = tl.load(as_ptrs + kb, mask=mmask, other=0.0)
        w_s = tl.load(ws_ptrs + kb)
        if SWAP_AB:
            if BLOCK_N <= 128:
                acc += tl.dot(w, a) * (a_s[None, :] * w_s)
            else:
                acc += tl.dot(w, a) * (w_s[:, None] * a_s[None, :])
        else:
            if BLOCK_N <= 128:
                acc += tl.dot(a, w) * (a_s[:, None] * w_s)
            else:
                acc += tl.dot(a, w) * (a_s[:, None] * w_s[None, :])
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SWAP_AB:
        acc = tl.trans(acc)
    _epilogue(acc, offs_m64, offs_n, mmask, pid, pid_k, M, N, split_k, bias_ptr, out_ptr, part_ptr, counter_ptr,
              stride_om, HAS_BIAS, SPLIT_MODE)


@triton.jit(do_not_specialize=["M", "k_blocks_per_split", "split_k", "group_m", "stride_asm", "stride_wsn"])
def _w8a8_dot_tma_kernel(
    a_desc, a_scale_ptr, w_desc, w_scale_ptr, bias_ptr, out_ptr, part_ptr, counter_ptr, M, N, K, k_blocks_per_split,
    split_k, group_m, stride_asm, stride_wsn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_MODE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # _w8a8_dot_kernel with pre-quantized activations, both operands loaded by TMA (tensor descriptors a [M, K]
    # e4m3, block [BLOCK_M, 128], rows past M read as zeros; w [N, K] e4m3, block [BLOCK_N, 128]): no address
    # registers per element, so wider tiles fit
    BLOCK_K: tl.constexpr = 128
    pdl_wait(PDL)  # the quantized activations are the quantization launch's output (kernels/pdl.py)
    pdl_release(PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _tile_of(pid, M, N, group_m, BLOCK_M, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    as_ptrs = a_scale_ptr + offs_m64 * stride_asm  # [BLOCK_M]
    if BLOCK_N <= 128:
        ws_ptrs = w_scale_ptr + (pid_n * BLOCK_N // 128) * stride_wsn
    else:
        ws_ptrs = w_scale_ptr + (offs_n // 128) * stride_wsn  # [BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first_kb = pid_k * k_blocks_per_split
    for kb in range(first_kb, tl.minimum(first_kb + k_blocks_per_split, K // BLOCK_K)):
        a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
        w = w_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])
        a_s = tl.load(as_ptrs + kb, mask=mmask, other=0.0)
        w_s = tl.load(ws_ptrs + kb)
        if BLOCK_N <= 128:
            acc += tl.dot(a, w.T) * (a_s[:, None] * w_s)
        else:
            acc += tl.dot(a, w.T) * (a_s[:, None] * w_s[None, :])
    _epilogue(acc, offs_m64, offs_n, mmask, pid, pid_k, M, N, split_k, bias_ptr, out_ptr, part_ptr, counter_ptr,
              stride_om, HAS_BIAS, SPLIT_MODE)


@triton.jit(do_not_specialize=["M", "k_blocks_per_split", "split_k", "stride_wsn"])
def _w8a8_gemv_kernel(
    a_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, part_ptr, counter_ptr, M, N, K, k_blocks_per_split, split_k,
    stride_am, stride_wn, stride_wsn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_MODE: tl.constexpr,
    FP8_MAX_C: tl.constexpr, MIN_SCALE: tl.constexpr, PDL: tl.constexpr = False,
):
    # a: the 16/32-bit input [M, K]; each row quantized per 128 columns as per_token_group_quant does, then used as
    # fp32 q * scale. BLOCK_N <= 128: one weight scale per program and K step.
    BLOCK_K: tl.constexpr = 128
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = N // BLOCK_N
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    rows = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + rows
    mmask = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    first_kb = pid_k * k_blocks_per_split
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] + first_kb * BLOCK_K  # [N_, K_]
    a_row0 = a_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_am + offs_k + first_kb * BLOCK_K  # [BLOCK_K]
    ws_ptr = w_scale_ptr + (pid_n * BLOCK_N // 128) * stride_wsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    last_kb = tl.minimum(first_kb + k_blocks_per_split, K // BLOCK_K)
    w_next = tl.load(w_ptrs)
    # PDL: the first weight tile above is the only read before the wait (kernels/pdl.py); a, the partials and the
    # counters come after it
    pdl_wait(PDL)
    pdl_release(PDL)
    for kb in range(first_kb, last_kb):
        # the next K step's weight tile is requested before this one is used: two tiles in flight per program
        # whether or not the compiler pipelines a load that feeds no dot
        w = w_next.to(tl.float32)
        w_ptrs += BLOCK_K
        w_next = tl.load(w_ptrs, mask=(kb + 1 < last_kb) & (offs_k < BLOCK_K)[None, :], other=0.0)
        w_s = tl.load(ws_ptr + kb)
        for i in tl.static_range(BLOCK_M):
            a = tl.load(a_row0 + i * stride_am, mask=(pid_m * BLOCK_M + i < M) & (offs_k < BLOCK_K),
                        other=0.0).to(tl.float32)
            a_s = tl.maximum(tl.max(tl.abs(a), 0) / FP8_MAX_C, MIN_SCALE)
            q = tl.clamp(a / a_s, -FP8_MAX_C, FP8_MAX_C).to(w_ptr.dtype.element_ty).to(tl.float32)
            p = tl.sum(w * q[None, :], 1) * (a_s * w_s)  # [BLOCK_N]
            acc += tl.where(rows[:, None] == i, p[None, :], 0.0)
        a_row0 += BLOCK_K
    _epilogue(acc, offs_m64, offs_n, mmask, pid, pid_k, M, N, split_k, bias_ptr, out_ptr, part_ptr, counter_ptr,
              stride_om, HAS_BIAS, SPLIT_MODE)


@triton.jit(do_not_specialize=["numel"])
def _split_k_reduce_kernel(part_ptr, bias_ptr, out_ptr, numel, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    # out[m, n] = sum_s part[s, m, n] (+ bias[n]), part [SPLIT_K, M, N] fp32 contiguous
    pdl_wait(PDL)  # the partials are the GEMM's output (kernels/pdl.py)
    pdl_release(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros([BLOCK], tl.float32)
    numel64 = numel.to(tl.int64)  # s * numel in int32 would wrap once SPLIT_K * M * N >= 2^31 (numel itself fits)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * numel64 + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
