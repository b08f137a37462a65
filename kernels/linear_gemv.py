"""16-bit dense linear for a few rows (decode): y = x W^T (+ b) as a weight stream, M <= 16 rows.

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
(kernels/linear_gemv_config.py) or the caller; the model uses the GEMV only where the table has one
(models/parallel_layers.py `_linear`), else cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import zeroed_counters
from kernels.linear_gemv_config import MAX_ROWS, check_config, table_config
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
def _k_step(acc, w, x_ptr, xt_ptrs, k0, K, M, offs_k, rows, stride_xm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            EVEN_K: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr):
    # one K step with the weight tile w: acc (DOT: out^T [BLOCK_N, BLOCK_M], else out [BLOCK_M, BLOCK_N]) updated
    if DOT:
        xmask = (rows < M)[None, :] if EVEN_K else (rows < M)[None, :] & (k0 + offs_k < K)[:, None]
        xt = tl.load(xt_ptrs + k0, mask=xmask, other=0.0)
        if IEEE:  # fp32 inputs: exact products (the default would round them to tf32)
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
    else:
        wf = w.to(tl.float32)
        for i in tl.static_range(BLOCK_M):
            xi = _row_vec(x_ptr + i * stride_xm, k0, K, offs_k, i < M, BLOCK_N, EVEN_K)
            p = tl.sum(wf * xi, 1)  # [BLOCK_N]: row i's share of this K step
            acc += tl.where(rows[:, None] == i, p[None, :], 0.0)
    return acc


@triton.jit(do_not_specialize=["M"])
def _gemv_linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, counter_ptr, M, N, K, k_per_split, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr, NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # x [M, K], w [N, K] (rows contiguous), out [M, N]; part [SPLIT_K, M, N] fp32 and counter [>= num tiles] int32
    # when SPLIT_K > 1. BLOCK_M: next_pow2(M) (DOT: 16). k_per_split: a multiple of BLOCK_K
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
        acc = _k_step(acc, w, x_ptr, xt_ptrs, k_start, K, M, offs_k, rows, stride_xm, BLOCK_M, BLOCK_N, EVEN_K, DOT,
                      IEEE)
        k_lo += BLOCK_K
    for k0 in tl.range(k_lo, k_end, BLOCK_K, num_stages=NUM_STAGES):
        w = _w_tile(w_ptrs, k0, K, offs_k, nmask, EVEN_K)
        acc = _k_step(acc, w, x_ptr, xt_ptrs, k0, K, M, offs_k, rows, stride_xm, BLOCK_M, BLOCK_N, EVEN_K, DOT, IEEE)
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
    if weight.stride(-1) != 1:
        raise ValueError("gemv_linear needs a weight with contiguous rows")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.stride(-1) != 1):
        raise ValueError(f"gemv_linear: bias of shape {list(bias.shape)}, expected contiguous [{n}]")
    return n, k


def gemv_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    config: dict | None = None) -> torch.Tensor:
    """x [..., K], weight [N, K] -> [..., N] in x.dtype, fp32 math (config: ignored, the kernel's signature)."""
    _check(x, weight, bias)
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gemv_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: dict | None = None) -> torch.Tensor:
    """x [..., K] with at most MAX_ROWS rows, weight [N, K] -> [..., N] in x.dtype. config: the tiling (see
    kernels/linear_gemv_config.py); by default the measured table's for this shape and GPU (an error without one)."""
    n, k = _check(x, weight, bias)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"gemv_linear takes at most {MAX_ROWS} rows, got {m}: use F.linear")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    cfg = table_config(m, n, k, x.device) if config is None else config
    if cfg is None:
        raise ValueError(f"gemv_linear: no measured config for M={m} [{n}, {k}] on this device: pass config= "
                         f"or use F.linear")
    check_config(cfg)
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
        x2, weight, bias if bias is not None else out, out, part, counters, m, n, k, steps_per_split * block_k,
        x2.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=16 if dot else triton.next_power_of_2(m), BLOCK_N=block_n,
        BLOCK_K=block_k, SPLIT_K=split, EVEN_K=k % block_k == 0, DOT=dot, IEEE=x.dtype == torch.float32,
        NUM_STAGES=cfg["num_stages"], PDL=pdl, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **launch_kwargs(pdl),
    )
    return out.view(*x.shape[:-1], n)


def dispatch_config(x: torch.Tensor, weight: torch.Tensor) -> dict | None:
    """The model's gate (models/parallel_layers.py `_linear`): the measured config when x [..., K] has 1..MAX_ROWS
    rows of the weight's 16-bit dtype and the table has the shape for this GPU, else None (cuBLAS). Host metadata
    and a cached lookup only: no GPU sync, safe inside CUDA-graph capture."""
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if not 1 <= m <= MAX_ROWS or x.dtype != weight.dtype or weight.dtype not in (torch.float16, torch.bfloat16):
        return None
    return table_config(m, weight.shape[0], k, x.device)
