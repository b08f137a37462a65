"""Dense linear for a few rows (decode): y = x W^T (+ b) as a weight stream, M <= 16 rows; 16-bit or FP8 weights.

At batch 1-16 an attention projection reads its whole weight once per call, so its time is bytes / bandwidth; cuBLAS
reached 0.53-0.65 of that floor on an H200 (Qwen3-30B-A3B qkv 7.7 us for 21 MB, o_proj 7.3 us + a 1.7 us split-K
reduce kernel). Here each program owns BLOCK_N output columns for ALL rows, so each weight byte is read once per
call, and walks its share of K (SPLIT_K programs per column tile) in BLOCK_K steps:
- DOT 0: the [BLOCK_N, BLOCK_K] weight tile is widened to fp32 and multiplied with each row's activations, then
  reduced over K ([BLOCK_N] per row, fp32 FMAs: for the smallest M). The activations are loaded per tile row as
  kernels/moe_gemv.py does (L1 hits, no shared-memory layout change per K step).
- DOT 1: tl.dot of the weight tile with x^T [BLOCK_K, 16] (the rows padded to 16; the weight rows on the MMA's
  64-row side, as the FP8 linear's SWAP_AB): tensor cores, for more rows.
Split K: program (tile, s) writes fp32 partials part[s] [M, N]; the last program of a tile to arrive (an arrival
counter per tile, left at zero again) sums all SPLIT_K partials in split order (+ bias): one launch, no value
atomics, the same bits every run whichever program finishes last. fp32 accumulation throughout; the output is in
x's dtype. (Tried: under PDL each program handing its whole weight slice to the sm90 L2 bulk prefetch before its
wait, so HBM would stream it while the predecessor drains. On an H200, Qwen3-30B-A3B o_proj, best tile with vs
without: 7.80 vs 7.68 us at M=1, 8.88 vs 8.04 at M=8; qkv 9.18 vs 8.83 at M=1: the latency-bound GEMV does not gain
from it and the extra requests cost. Not kept.) The config comes from the measured table
(kernels/linear/gemv_config.py) or the caller; the model uses the GEMV only where the table has one
(models/parallel_layers.py `_linear`), else cuBLAS.

FP8 weights (gemv_linear_fp8, weight-only W8A16): W e4m3 [N, K] with fp32 weight_scale_inv [N/128, K/128] (the HF
block layout); x stays 16-bit, nothing is quantized on the fly. The same kernel (FP8=True) reads half the bytes of
bf16; each tile is widened to fp16 (exact: one packed cvt.rn.f16x2.e4m3x2 per two values on sm89+, through inline
PTX that the compiler cannot move into a dot operand's layout change; Triton's cast in the interpreter), then to fp32
(FMA tiles) or x's dtype (tl.dot tiles). The block scale multiplies each row's sum over a 128-wide K block once, not
every element (kernels/moe_gemv.py _partial): FMA tiles sum each K step per scale block ([BLOCK_N, BLOCK_K / 128]
partials when BLOCK_K > 128), tl.dot tiles take BLOCK_K <= 128 and scale the step's [BLOCK_N, 16] product. The
measured FP8 table (kernels/configs/linear_gemv_fp8_<gpu>.json) has an entry only where this beat the W8A8 block
linear (kernels/linear/w8a8.py, which also rounds x to e4m3: the W8A16 result is the closer one to x @ W^T).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import zeroed_counters
from kernels.fp8 import FP8_BLOCK, FP8_DTYPE, dequantize_weight_block, native_e4m3_cvt, widen_e4m3
from kernels.linear.gemv_config import MAX_ROWS, check_config, table_config
from kernels.pdl import launch_kwargs, pdl_enabled, pdl_release, pdl_wait

_COUNTERS: dict = {}  # per device: arrivals per column tile of the split-K reduce (kernels.zeroed_counters)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _row_vec(x_row_ptr, k0, K, offs_k, row_ok, BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr):
    # one row's activations of a K step, fp32, loaded once per weight-tile row: [BLOCK_N, BLOCK_K]. The repeats hit
    # L1 (kernels/moe_gemv.py _load_vec); row_ok False (a padding row) loads nothing
    ptrs = x_row_ptr + k0 + offs_k[None, :] + tl.zeros([BLOCK_N, 1], tl.int32)
    if EVEN_K:
        return tl.load(ptrs, mask=row_ok, other=0.0).to(tl.float32)
    else:
        return tl.load(ptrs, mask=row_ok & (k0 + offs_k < K)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _w_tile(w_ptrs, k0, K, offs_k, nmask, EVEN_K: tl.constexpr):
    # the [BLOCK_N, BLOCK_K] weight tile of the K step at k0
    if EVEN_K:
        return tl.load(w_ptrs + k0, mask=nmask[:, None], other=0.0)
    else:
        return tl.load(w_ptrs + k0, mask=nmask[:, None] & (k0 + offs_k < K)[None, :], other=0.0)


@triton.jit
def _widen(w, dtype: tl.constexpr, FP8: tl.constexpr, WIDEN_ASM: tl.constexpr):
    # the weight tile in dtype: e4m3 through fp16 (exact, every e4m3 value is an fp16 and a bf16 one); without
    # WIDEN_ASM (the interpreter, pre-sm89) Triton's cast, the same values
    if FP8 and WIDEN_ASM:
        w = widen_e4m3(w)  # kernels/fp8.py: impure, so no layout change is hoisted above it
    return w.to(dtype)


@triton.jit
def _k_step(acc, w, x_ptr, xt_ptrs, s_ptrs, k0, K, M, offs_k, rows, nmask, stride_xm, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr,
            IEEE: tl.constexpr, FP8: tl.constexpr, WIDEN_ASM: tl.constexpr):
    # one K step with the weight tile w: acc (DOT: out^T [BLOCK_N, BLOCK_M], else out [BLOCK_M, BLOCK_N]) updated.
    # FP8: s_ptrs [BLOCK_N] point at the rows' block-scale rows; each row's sum over a 128-wide K block is scaled once
    # (the tile's products stay unscaled)
    KB: tl.constexpr = BLOCK_K // 128  # scale blocks per K step (0: the step lies inside one)
    if DOT:
        xmask = (rows < M)[None, :] if EVEN_K else (rows < M)[None, :] & (k0 + offs_k < K)[:, None]
        xt = tl.load(xt_ptrs + k0, mask=xmask, other=0.0)
        if FP8:  # BLOCK_K <= 128 (check_config): one scale per row
            wd = _widen(w, xt.dtype, FP8, WIDEN_ASM)
            if IEEE:
                p = tl.dot(wd, xt, input_precision="ieee")
            else:
                p = tl.dot(wd, xt)
            acc += p * tl.load(s_ptrs + k0 // 128, mask=nmask, other=0.0)[:, None]
        elif IEEE:  # fp32 inputs: exact products (the default would round them to tf32)
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
    else:
        wf = _widen(w, tl.float32, FP8, WIDEN_ASM)
        if FP8:
            if KB <= 1:
                s = tl.load(s_ptrs + k0 // 128, mask=nmask, other=0.0)  # [BLOCK_N]
            else:
                kb = k0 // 128 + tl.arange(0, KB)
                s = tl.load(s_ptrs[:, None] + kb[None, :], mask=nmask[:, None] & (kb * 128 < K)[None, :],
                            other=0.0)  # [BLOCK_N, KB]
        for i in tl.static_range(BLOCK_M):
            xi = _row_vec(x_ptr + i * stride_xm, k0, K, offs_k, i < M, BLOCK_N, EVEN_K)
            prod = wf * xi
            if not FP8:
                p = tl.sum(prod, 1)  # [BLOCK_N]: row i's share of this K step
            elif KB <= 1:
                p = tl.sum(prod, 1) * s
            else:
                p = tl.sum(tl.sum(tl.reshape(prod, [BLOCK_N, KB, 128]), 2) * s, 1)
            acc += tl.where(rows[:, None] == i, p[None, :], 0.0)
    return acc


@triton.jit(do_not_specialize=["M"])
def _gemv_linear_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr, counter_ptr, M, N, K, k_per_split, stride_xm, stride_wn,
    stride_wsn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr, NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr = False, FP8: tl.constexpr = False, WIDEN_ASM: tl.constexpr = False,
):
    # x [M, K], w [N, K] (rows contiguous), out [M, N]; part [SPLIT_K, M, N] fp32 and counter [>= num tiles] int32
    # when SPLIT_K > 1. BLOCK_M: next_pow2(M) (DOT: 16). k_per_split: a multiple of BLOCK_K. FP8: w e4m3 and ws
    # [cdiv(N, 128), cdiv(K, 128)] fp32 its block scales (weight_scale_inv), else ws is unused
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K] at k = 0
    xt_ptrs = x_ptr + rows.to(tl.int64)[None, :] * stride_xm + offs_k[:, None]  # x^T [BLOCK_K, BLOCK_M] at k = 0 (DOT)
    s_ptrs = ws_ptr + (offs_n // 128) * stride_wsn  # [BLOCK_N] the rows' scale rows (FP8)
    if DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # out^T of the tile
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_lo = k_start
    if PDL:
        # the first K step's weights are no kernel's output: read them while the predecessor drains
        # (kernels/pdl.py); x, the partials and the counters only after the wait
        w = _w_tile(w_ptrs, k_start, K, offs_k, nmask, EVEN_K)
        pdl_wait(PDL)
        pdl_release(PDL)
        acc = _k_step(acc, w, x_ptr, xt_ptrs, s_ptrs, k_start, K, M, offs_k, rows, nmask, stride_xm, BLOCK_M, BLOCK_N,
                      BLOCK_K, EVEN_K, DOT, IEEE, FP8, WIDEN_ASM)
        k_lo += BLOCK_K
    for k0 in tl.range(k_lo, k_end, BLOCK_K, num_stages=NUM_STAGES):
        w = _w_tile(w_ptrs, k0, K, offs_k, nmask, EVEN_K)
        acc = _k_step(acc, w, x_ptr, xt_ptrs, s_ptrs, k0, K, M, offs_k, rows, nmask, stride_xm, BLOCK_M, BLOCK_N,
                      BLOCK_K, EVEN_K, DOT, IEEE, FP8, WIDEN_ASM)
    if DOT:
        acc = tl.trans(acc)
    # epilogue: acc [BLOCK_M, BLOCK_N] fp32
    omask = (rows < M)[:, None] & nmask[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        numel = M.to(tl.int64) * N
        tile_offs = rows.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_k * numel + tile_offs, acc, mask=omask)
        # every thread's partial stores precede the release of the counter; the last program of the tile sums
        tl.debug_barrier()
        if tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel") == SPLIT_K - 1:
            # unrolled: all SPLIT_K loads in flight at once (a runtime loop waits on each in turn); summed in split
            # order, its own partial read back too, so the bits do not depend on which split came last
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(part_ptr + s * numel + tile_offs, mask=omask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(counter_ptr + pid_n, 0)  # ready for the next launch / graph replay


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    if weight.dim() != 2 or weight.dtype not in _DTYPES:
        raise ValueError(f"gemv_linear needs a 2-D fp16/bf16/fp32 weight, got {weight.dtype} {list(weight.shape)}")
    n, k = weight.shape
    if x.dtype != weight.dtype or x.shape[-1] != k:
        raise ValueError(f"gemv_linear: x {x.dtype} {list(x.shape)} does not match the weight {weight.dtype} "
                         f"[{n}, {k}]")
    _check_common(weight, bias, n)
    return n, k


def _check_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               bias: torch.Tensor | None) -> tuple[int, int]:
    if weight.dim() != 2 or weight.dtype != FP8_DTYPE:
        raise ValueError(f"gemv_linear_fp8 needs a 2-D {FP8_DTYPE} weight, got {weight.dtype} {list(weight.shape)}")
    n, k = weight.shape
    if x.dtype not in _DTYPES or x.shape[-1] != k:
        raise ValueError(f"gemv_linear_fp8: x {x.dtype} {list(x.shape)} does not match the weight [{n}, {k}] (x: "
                         f"fp16/bf16/fp32)")
    blocks = (triton.cdiv(n, FP8_BLOCK), triton.cdiv(k, FP8_BLOCK))
    if (weight_scale_inv.dtype != torch.float32 or tuple(weight_scale_inv.shape) != blocks
            or weight_scale_inv.stride(-1) != 1):
        raise ValueError(f"gemv_linear_fp8 needs fp32 weight_scale_inv of shape {list(blocks)} with contiguous rows, "
                         f"got {weight_scale_inv.dtype} {list(weight_scale_inv.shape)}")
    _check_common(weight, bias, n)
    return n, k


def _check_common(weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> None:
    if weight.stride(-1) != 1:
        raise ValueError("gemv_linear needs a weight with contiguous rows")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.stride(-1) != 1):
        raise ValueError(f"gemv_linear: bias of shape {list(bias.shape)}, expected contiguous [{n}]")


def gemv_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    config: dict | None = None) -> torch.Tensor:
    """x [..., K], weight [N, K] -> [..., N] in x.dtype, fp32 math (config: ignored, the kernel's signature)."""
    _check(x, weight, bias)
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gemv_linear_fp8_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                        bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [..., K] float, weight [N, K] e4m3, weight_scale_inv [N/128, K/128] fp32 (blocks rounded up) -> [..., N] in
    x.dtype: the dequantized weight times x in fp32 (W8A16: x is not quantized; config ignored)."""
    _check_fp8(x, weight, weight_scale_inv, bias)
    y = x.float() @ dequantize_weight_block(weight, weight_scale_inv, torch.float32).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
            config: dict | None, n: int, k: int, what: str) -> torch.Tensor:
    # both wrappers after their checks: scale is weight_scale_inv for an e4m3 weight, else None
    fp8 = scale is not None
    fallback = "w8a8_block_linear" if fp8 else "F.linear"
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"{what} takes at most {MAX_ROWS} rows, got {m}: use {fallback}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    cfg = table_config(m, n, k, x.device, fp8) if config is None else config
    if cfg is None:
        raise ValueError(f"{what}: no measured config for M={m} [{n}, {k}] on this device: pass config= "
                         f"or use {fallback}")
    check_config(cfg, fp8)
    dot = bool(cfg.get("DOT", 0))
    block_n, block_k = cfg["BLOCK_N"], cfg["BLOCK_K"]
    # whole K steps per split, no empty split (the split may come out smaller than asked)
    steps = triton.cdiv(k, block_k)
    steps_per_split = triton.cdiv(steps, min(cfg["SPLIT_K"], steps))
    split = triton.cdiv(steps, steps_per_split)
    tiles = triton.cdiv(n, block_n)
    part = counters = out  # (unused pointers without split K)
    if split > 1:
        part = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        counters = zeroed_counters(_COUNTERS, tiles, x.device, 4096)
    pdl = pdl_enabled(x.device)
    _gemv_linear_kernel[(tiles, split)](
        x2, weight, scale if fp8 else out, bias if bias is not None else out, out, part, counters, m, n, k,
        steps_per_split * block_k, x2.stride(0), weight.stride(0), scale.stride(0) if fp8 else 0, out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=16 if dot else triton.next_power_of_2(m), BLOCK_N=block_n,
        BLOCK_K=block_k, SPLIT_K=split, EVEN_K=k % block_k == 0, DOT=dot, IEEE=x.dtype == torch.float32,
        NUM_STAGES=cfg["num_stages"], PDL=pdl, FP8=fp8, WIDEN_ASM=fp8 and native_e4m3_cvt(x.device),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_kwargs(pdl),
    )
    return out.view(*x.shape[:-1], n)


def gemv_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: dict | None = None) -> torch.Tensor:
    """x [..., K] with at most MAX_ROWS rows, weight [N, K] -> [..., N] in x.dtype. config: the tiling (see
    kernels/linear/gemv_config.py); by default the measured table's for this shape and GPU (an error without one)."""
    n, k = _check(x, weight, bias)
    return _launch(x, weight, None, bias, config, n, k, "gemv_linear")


def gemv_linear_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                    bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """W8A16: x [..., K] (fp16/bf16; fp32 in the interpreter) with at most MAX_ROWS rows, weight [N, K] e4m3 with
    weight_scale_inv [cdiv(N, 128), cdiv(K, 128)] fp32 -> [..., N] in x.dtype; x stays unquantized. config: as
    gemv_linear's (DOT tiles with BLOCK_K <= 128), by default the measured FP8 table's."""
    n, k = _check_fp8(x, weight, weight_scale_inv, bias)
    return _launch(x, weight, weight_scale_inv, bias, config, n, k, "gemv_linear_fp8")


def dispatch_config(x: torch.Tensor, weight: torch.Tensor) -> dict | None:
    """The model's gate (models/parallel_layers.py `_linear`): the measured config when x [..., K] has 1..MAX_ROWS
    fp16/bf16 rows, the weight is of x's dtype (gemv_linear) or e4m3 (gemv_linear_fp8, the FP8 table), and the table
    has the shape for this GPU; else None (cuBLAS, or w8a8_block_linear for FP8). Host metadata and a cached lookup
    only: no GPU sync, safe inside CUDA-graph capture."""
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    fp8 = weight.dtype == FP8_DTYPE
    if not 1 <= m <= MAX_ROWS or x.dtype not in (torch.float16, torch.bfloat16) or not (fp8 or x.dtype == weight.dtype):
        return None
    return table_config(m, weight.shape[0], k, x.device, fp8)
