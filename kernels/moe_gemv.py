"""Fused MoE experts for a few tokens as matrix-vector products: one program per (column tile, pair).

At one decode token a (token, expert) pair is a GEMV: the tl.dot kernels of kernels/fused_moe.py pad it to a
16-row MMA (15 rows of zeros) and, for FP8, dequantize each weight tile to bf16 in registers, which kept FP8 at
0.38 of its bandwidth floor. Here each program multiplies the token's activation vector by a [BLOCK_N, BLOCK_K]
weight tile in fp32 (multiply, then a row reduce), so each weight element costs one widening and one FMA; FP8
weights are widened once (e4m3 -> f16, one packed F2FP per two values on sm90, then -> fp32) and the [128, 128]
block scale multiplies each row's per-128-K partial sum, not every element. The activations are loaded per tile
row (L1 hits; a thread's rows share one load and conversion), which avoids a shared-memory layout change per K
step. Rows are split finely (BLOCK_N of 4..64) so that thousands of programs keep HBM busy without splitting
K: each output is one fixed-order fp32 sum, bit-reproducible run to run (no atomics on values).

Outputs are defined as fused_moe's: up writes silu(gate) * up rounded to the activation dtype per pair, down
writes y[pair] = topk_weight * (h . w2[e]) rounded per pair, then the top-k sum (a launch, or with
config "fused_sum" at one token the last slot per column tile, as in fused_moe). FP8 runs weight-only (W8A16):
activations stay 16-bit. The torch reference is fused_experts_ref (kernels/fused_moe.py, act_fp8=False).

Config (the "gemv" key of a moe_config table entry): {"up": {BLOCK_N, BLOCK_K, num_warps, num_stages},
"down": {...}, "max_tokens": int, "fused_sum": bool, "pdl": bool, "prefetch": bool, "down_topk": bool}.
down_topk (default off): the down GEMM runs one program per (column tile, token) over all of the token's top-k slots
(_gemv_down_topk_kernel: a [top_k x BLOCK_N, BLOCK_K] tile of rows from top_k experts per K step, top_k times the
per-pair kernel's bytes in flight), each slot weighted and rounded as y would be and the slots added in registers in
slot order: the bits of the per-pair kernel + the top-k sum, with no y buffer, no atomic tail and no sum launch at
any token count; "down" is then its tile (BLOCK_N columns per slot) and fused_sum is moot. pdl: both kernels (and the
top-k sum) are launched with programmatic dependent launch on a Hopper GPU (kernels/pdl.py; the global switch,
on by default there, turns it on whatever the table says). The up kernel waits first (its ids are its predecessor's
output); the down kernel reads the ids and its first K step's weights before its wait (rule (1') of kernels/pdl.py:
the router wrote them two kernels back), which is what the table's pdl variant measured (25.4 -> 23.6 us per layer
at one bf16 token on an H200). prefetch: the
up kernel's programs first hand the pair's down weights w2[e] to the bulk-copy engine (cp.async.bulk.prefetch.L2),
so HBM streams both GEMMs' weights during the up kernel and the down kernel reads L2 (worth it while the touched w2
fits in L2: few tokens, FP8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.moe_sum import TopKSlots, _one_token_sum, _sum_counters, moe_sum
from kernels.pdl import env_switch, launch_kwargs, pdl_release, pdl_supported, pdl_wait

GEMV_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


@triton.jit
def _load_vec(ptrs, k0, K, offs_k, BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr):
    # the activations of one K step, fp32, loaded once per row of the weight tile: [BLOCK_N, BLOCK_K]. The
    # repeats are L1 hits; a [BLOCK_K] load broadcast to the tile would take a shared-memory layout change and
    # barriers every step
    ptrs2 = ptrs[None, :] + k0 + tl.zeros([BLOCK_N, 1], tl.int32)
    if EVEN_K:
        return tl.load(ptrs2).to(tl.float32)
    else:
        return tl.load(ptrs2, mask=(offs_k + k0 < K)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_tile(ptrs, k0, K, offs_k, nmask, EVEN_K: tl.constexpr, EVICT: tl.constexpr):
    # [BLOCK_N, BLOCK_K] weights of one K step, as stored (16-bit or e4m3)
    if EVEN_K:
        return tl.load(ptrs + k0, mask=nmask[:, None], other=0.0, eviction_policy=EVICT)
    else:
        return tl.load(ptrs + k0, mask=nmask[:, None] & (offs_k + k0 < K)[None, :], other=0.0, eviction_policy=EVICT)


@triton.jit
def _partial(w, x, s_ptrs, k0, K, nmask, USE_FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # sum_k w[n, k] * x[n, k] over one K step in fp32: [BLOCK_N]. FP8: s_ptrs [BLOCK_N] point at the rows' scale
    # rows, and each row's 128-wide partial sums are scaled once (not every element)
    prod = w.to(tl.float32) * x
    KB: tl.constexpr = BLOCK_K // 128
    if not USE_FP8:
        res = tl.sum(prod, 1)
    elif KB <= 1:  # the step lies inside one 128-wide scale block
        res = tl.sum(prod, 1) * tl.load(s_ptrs + k0 // 128, mask=nmask, other=0.0)
    else:
        part = tl.sum(tl.reshape(prod, [BLOCK_N, KB, 128]), 2)  # [BLOCK_N, KB] per-scale-block sums
        kb = k0 // 128 + tl.arange(0, KB)
        s = tl.load(s_ptrs[:, None] + kb[None, :], mask=nmask[:, None] & (kb * 128 < K)[None, :], other=0.0)
        res = tl.sum(part * s, 1)
    return res


@triton.jit
def _prefetch_l2(ptr, nbytes, PIECES: tl.constexpr):
    # bytes [ptr, ptr + nbytes) into L2 by the sm90 bulk-copy engine (no registers, no load slots), one piece
    # per thread (PIECES = threads): ptr 16-byte aligned, nbytes a multiple of 16
    piece = tl.cdiv(nbytes, PIECES * 16) * 16
    start = tl.arange(0, PIECES) * piece
    size = tl.minimum(nbytes - start, piece).to(tl.int32)
    addr = ptr.to(tl.pointer_type(tl.int8)) + start
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit(do_not_specialize=["num_pairs"])
def _gemv_up_kernel(
    x_ptr, w_ptr, ws_ptr, out_ptr, ids_ptr, w2_ptr, num_pairs, K, INTER, top_k,
    stride_xt, stride_we, stride_wn, stride_wse, stride_wsn, stride_ot, stride_w2e,
    USE_FP8: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, PIECES: tl.constexpr,
):
    # out[p, n] = silu(x[tok(p)] . w[e, n]) * (x[tok(p)] . w[e, INTER + n]), e = ids[p]; out [num_pairs, INTER]
    pid = tl.program_id(0)
    pid_n = pid // num_pairs  # pairs inner: the pairs of a tile run together, a repeated expert hits L2
    pair = pid % num_pairs
    pdl_wait(PDL)  # the ids are the router's output, x the norm's (kernels/pdl.py)
    pdl_release(PDL)
    e = tl.load(ids_ptr + pair).to(tl.int64)
    if e < 0:
        return
    if PREFETCH:
        # the down GEMM's weights for this pair, w2[e] ([N_down, INTER], contiguous), into L2 now: HBM streams
        # them alongside w13 and the down kernel reads them from L2. Column tile pid_n takes its share.
        num_tiles = tl.cdiv(INTER, BLOCK_N)
        w2_bytes = stride_w2e * w2_ptr.dtype.element_ty.primitive_bitwidth // 8
        share = tl.cdiv(w2_bytes, num_tiles * 16) * 16
        start = pid_n * share
        _prefetch_l2(w2_ptr.to(tl.pointer_type(tl.int8)) + e * w2_bytes + start,
                     tl.maximum(tl.minimum(share, w2_bytes - start), 0), PIECES)
    tok = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < INTER
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok * stride_xt + offs_k  # [BLOCK_K]
    wg_ptrs = w_ptr + e * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    wu_ptrs = wg_ptrs + INTER * stride_wn  # the up rows, INTER below the gate rows
    sg_ptrs = ws_ptr + e * stride_wse + (offs_n // 128) * stride_wsn  # [BLOCK_N] scale rows (FP8)
    su_ptrs = ws_ptr + e * stride_wse + ((offs_n + INTER) // 128) * stride_wsn
    # with the prefetch, w13 streams through L2 marked evict-first: it must not push out the prefetched w2
    EVICT: tl.constexpr = "evict_first" if PREFETCH else ""
    acc_g = tl.zeros([BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_N], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        x = _load_vec(x_ptrs, k0, K, offs_k, BLOCK_N, EVEN_K)
        wg = _load_tile(wg_ptrs, k0, K, offs_k, nmask, EVEN_K, EVICT)
        wu = _load_tile(wu_ptrs, k0, K, offs_k, nmask, EVEN_K, EVICT)
        acc_g += _partial(wg, x, sg_ptrs, k0, K, nmask, USE_FP8, BLOCK_N, BLOCK_K)
        acc_u += _partial(wu, x, su_ptrs, k0, K, nmask, USE_FP8, BLOCK_N, BLOCK_K)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(out_ptr + pair.to(tl.int64) * stride_ot + offs_n, h.to(out_ptr.dtype.element_ty), mask=nmask)


@triton.jit(do_not_specialize=["num_pairs"])
def _gemv_down_kernel(
    a_ptr, w_ptr, ws_ptr, y_ptr, ids_ptr, topk_weights_ptr, sum_ptr, counter_ptr, num_pairs, K, N,
    stride_at, stride_we, stride_wn, stride_wse, stride_wsn, stride_yt,
    USE_FP8: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, PDL: tl.constexpr, FUSED_SUM: tl.constexpr, TOP_K: tl.constexpr,
    TOP_K_PAD: tl.constexpr,
):
    # y[p, n] = topk_weights[p] * a[p] . w[e, n], e = ids[p]; a [num_pairs, K] (the up output), y [num_pairs, N].
    # FUSED_SUM (one token): also sum_ptr[n] = sum over the handled slots of y[slot, n] (fused_moe's rule)
    pid = tl.program_id(0)
    pid_n = pid // num_pairs
    pair = pid % num_pairs
    # the ids and, through them, the first K step's weights are read before the wait: the router wrote the ids
    # two kernels back, complete before the up kernel passed its wait and released this one (rule (1') of
    # kernels/pdl.py); a (the up kernel's output) only after it
    # (.cg: from L2, never a line this SM's L1 may still hold from an earlier layer's ids at the same address)
    e = tl.load(ids_ptr + pair, cache_modifier=".cg").to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    if FUSED_SUM:
        kk = tl.arange(0, TOP_K_PAD)
        num_handled = tl.sum((tl.load(ids_ptr + kk, mask=kk < TOP_K, other=-1, cache_modifier=".cg") >= 0)
                             .to(tl.int32), 0)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + pair.to(tl.int64) * stride_at + offs_k  # [BLOCK_K]
    e_row = tl.maximum(e, 0)  # (a slot not handled here loads nothing and returns after the wait)
    w_ptrs = w_ptr + e_row * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BN, BK]
    s_ptrs = ws_ptr + e_row * stride_wse + (offs_n // 128) * stride_wsn  # [BLOCK_N] scale rows (FP8)
    if PDL:  # while the up kernel drains
        w_first = _load_tile(w_ptrs, 0, K, offs_k, nmask & (e >= 0), EVEN_K, "")
    pdl_wait(PDL)
    pdl_release(PDL)
    if FUSED_SUM:
        if num_handled == 0:  # no slot of the token is handled here: slot 0 writes its zero sum
            if pair == 0:
                tl.store(sum_ptr + offs_n, tl.zeros([BLOCK_N], tl.float32).to(sum_ptr.dtype.element_ty), mask=nmask)
    if e < 0:
        return
    wk = tl.load(topk_weights_ptr + pair)  # issued before the K loop: its latency hides under the weight loads
    if PDL:
        acc = _partial(w_first, _load_vec(a_ptrs, 0, K, offs_k, BLOCK_N, EVEN_K), s_ptrs, 0, K, nmask, USE_FP8,
                       BLOCK_N, BLOCK_K)
        k_start: tl.constexpr = BLOCK_K
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)
        k_start: tl.constexpr = 0
    for k0 in tl.range(k_start, K, BLOCK_K, num_stages=NUM_STAGES):
        w = _load_tile(w_ptrs, k0, K, offs_k, nmask, EVEN_K, "")
        a = _load_vec(a_ptrs, k0, K, offs_k, BLOCK_N, EVEN_K)
        acc += _partial(w, a, s_ptrs, k0, K, nmask, USE_FP8, BLOCK_N, BLOCK_K)
    acc *= wk
    tl.store(y_ptr + pair.to(tl.int64) * stride_yt + offs_n, acc.to(y_ptr.dtype.element_ty), mask=nmask)
    if FUSED_SUM:
        _one_token_sum(y_ptr, ids_ptr, sum_ptr, counter_ptr, pid_n, offs_n, nmask, num_handled, N, TOP_K, BLOCK_N)


@triton.jit
def _load_rows(ptrs, k0, K, offs_k, rmask, EVEN_K: tl.constexpr):
    # [ROWS, BLOCK_K] activations, each row its own pair's vector (fp32); rows not handled here load zeros (the
    # up kernel wrote nothing there)
    if EVEN_K:
        return tl.load(ptrs + k0, mask=rmask[:, None], other=0.0).to(tl.float32)
    else:
        return tl.load(ptrs + k0, mask=rmask[:, None] & (offs_k + k0 < K)[None, :], other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["num_tokens"])
def _gemv_down_topk_kernel(
    a_ptr, w_ptr, ws_ptr, out_ptr, ids_ptr, topk_weights_ptr, num_tokens, K, N,
    stride_at, stride_we, stride_wn, stride_wse, stride_wsn, stride_ot,
    USE_FP8: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, PDL: tl.constexpr, TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr,
):
    # the down GEMM and the top-k sum of one token's column tile in one program (config "down_topk"): rows r of the
    # [TOP_K_PAD * BLOCK_N, BLOCK_K] weight tile are row n = r % BLOCK_N of the expert of slot k = r // BLOCK_N,
    # so one K step has all the token's experts' loads in flight (TOP_K times _gemv_down_kernel's bytes) and the
    # sum needs no y round trip, no atomic and no second launch. Per slot the dot, the weight and the rounding to
    # out's dtype are _gemv_down_kernel's; the rounded rows are added in slot order in fp32 as _moe_sum_kernel
    # does: out[t, n] = sum_k round(topk_weights[t, k] * a[t * TOP_K + k] . w[e_k, n]) over the handled slots
    pid = tl.program_id(0)
    pid_n = pid // num_tokens  # tokens inner: the tokens of a column tile run together, a shared expert hits L2
    tok = pid % num_tokens
    ROWS: tl.constexpr = TOP_K_PAD * BLOCK_N
    r = tl.arange(0, ROWS)
    slot = r // BLOCK_N
    offs_n = pid_n * BLOCK_N + r % BLOCK_N  # [ROWS]
    pair = tok.to(tl.int64) * TOP_K + slot  # [ROWS]
    # the ids (rule (1') of kernels/pdl.py: the router wrote them two kernels back) and the first K step's
    # weights before the wait; .cg: never a line this SM's L1 may hold from an earlier layer's ids
    e = tl.load(ids_ptr + pair, mask=slot < TOP_K, other=-1, cache_modifier=".cg").to(tl.int64)
    rmask = (offs_n < N) & (e >= 0)  # rows of this tile that exist and whose slot is handled here
    e_row = tl.maximum(e, 0)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + e_row[:, None] * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    a_ptrs = a_ptr + pair[:, None] * stride_at + offs_k[None, :]  # [ROWS, BLOCK_K]
    s_ptrs = ws_ptr + e_row * stride_wse + (offs_n // 128) * stride_wsn  # [ROWS] scale rows (FP8)
    if PDL:  # while the up kernel drains
        w_first = _load_tile(w_ptrs, 0, K, offs_k, rmask, EVEN_K, "")
    pdl_wait(PDL)
    pdl_release(PDL)
    wk = tl.load(topk_weights_ptr + pair, mask=rmask, other=0.0)  # before the K loop: hidden under its loads
    if PDL:
        acc = _partial(w_first, _load_rows(a_ptrs, 0, K, offs_k, rmask, EVEN_K), s_ptrs, 0, K, rmask, USE_FP8,
                       ROWS, BLOCK_K)
        k_start: tl.constexpr = BLOCK_K
    else:
        acc = tl.zeros([ROWS], tl.float32)
        k_start: tl.constexpr = 0
    for k0 in tl.range(k_start, K, BLOCK_K, num_stages=NUM_STAGES):
        w = _load_tile(w_ptrs, k0, K, offs_k, rmask, EVEN_K, "")
        a = _load_rows(a_ptrs, k0, K, offs_k, rmask, EVEN_K)
        acc += _partial(w, a, s_ptrs, k0, K, rmask, USE_FP8, ROWS, BLOCK_K)
    # per slot as _gemv_down_kernel stores y: the weighted dot rounded to out's dtype; unhandled slots add 0.0
    y = tl.where(rmask, (acc * wk).to(out_ptr.dtype.element_ty).to(tl.float32), 0.0)
    y = tl.reshape(y, [TOP_K_PAD, BLOCK_N])
    kk = tl.arange(0, TOP_K_PAD)[:, None]
    total = tl.zeros([BLOCK_N], tl.float32)
    for k in tl.static_range(TOP_K):  # slot order; each column sum adds one row to zeros: exact
        total += tl.sum(tl.where(kk == k, y, 0.0), 0)
    offs_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + tok.to(tl.int64) * stride_ot + offs_out, total.to(out_ptr.dtype.element_ty),
             mask=offs_out < N)


def check_gemv_config(gemv: dict) -> None:
    for g in ("up", "down"):
        tile = gemv.get(g)
        if not isinstance(tile, dict) or any(not isinstance(tile.get(k), int) for k in GEMV_KEYS):
            raise ValueError(f"MoE config 'gemv' needs '{g}' with integer {', '.join(GEMV_KEYS)}; got {tile!r}")
        if any(tile[k] & (tile[k] - 1) for k in ("BLOCK_N", "BLOCK_K")):
            raise ValueError(f"MoE config 'gemv' {g}: BLOCK_N and BLOCK_K must be powers of two, got {tile}")


def _sm90(device: torch.device) -> bool:
    # griddepcontrol (PDL) and cp.async.bulk.prefetch are sm_90+ PTX, which ptxas rejects for older GPUs; those can
    # still get a table with pdl/prefetch on: moe_config falls back to another GPU's table (the H200's) for a shape
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def gemv_experts(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * inter, hidden]
    w2: torch.Tensor,  # [num_experts, hidden, inter]
    topk_weights: torch.Tensor,  # [num_tokens, top_k] fp32
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int, -1 = slot not handled here
    gemv: dict,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    defer_sum: bool = False,
) -> torch.Tensor | TopKSlots:
    """fused_experts by per-pair GEMVs, given fused_experts' input checks; [num_tokens, hidden] (or, defer_sum, its
    per-slot outputs where the top-k sum would be a launch of its own)."""
    check_gemv_config(gemv)
    num_tokens, h = hidden.shape
    top_k = topk_ids.shape[1]
    inter = w2.shape[2]
    num_pairs = num_tokens * top_k
    fp8 = w13_scale is not None
    w13s, w2s = (w13_scale, w2_scale) if fp8 else (w13, w2)  # (scale pointers unused without FP8)
    up, down = gemv["up"], gemv["down"]
    down_topk = bool(gemv.get("down_topk", False))
    fused_sum = num_tokens == 1 and bool(gemv.get("fused_sum", False)) and not down_topk
    sm90 = _sm90(hidden.device)
    # the table's choice or the global switch, on a GPU where PDL is supported (kernels/pdl.py)
    pdl = pdl_supported(hidden.device) and (bool(gemv.get("pdl", False)) or env_switch())
    inter_out = torch.empty(num_pairs, inter, dtype=hidden.dtype, device=hidden.device)
    out = torch.empty_like(hidden)
    num_tiles_n = triton.cdiv(h, down["BLOCK_N"])
    # (before the up launch: the counters' first zeroing, a torch launch, stays out of the up -> down PDL pair)
    counters = _sum_counters(num_tiles_n, hidden.device) if fused_sum else topk_ids
    # L2 prefetch of w2 (sm90 bulk copies): rows of whole 16-byte units keep every piece aligned
    prefetch = bool(gemv.get("prefetch", False)) and sm90 and inter * w2.element_size() % 16 == 0
    _gemv_up_kernel[(triton.cdiv(inter, up["BLOCK_N"]) * num_pairs,)](
        hidden, w13, w13s, inter_out, topk_ids, w2, num_pairs, h, inter, top_k,
        hidden.stride(0), w13.stride(0), w13.stride(1), w13s.stride(0), w13s.stride(1), inter_out.stride(0),
        w2.stride(0), USE_FP8=fp8, EVEN_K=h % up["BLOCK_K"] == 0, BLOCK_N=up["BLOCK_N"], BLOCK_K=up["BLOCK_K"],
        NUM_STAGES=up["num_stages"], PDL=pdl, PREFETCH=prefetch, PIECES=32 * up["num_warps"],
        num_warps=up["num_warps"], **launch_kwargs(pdl),
    )
    if down_topk:  # the down GEMM and the top-k sum per (column tile, token): no y, no counters, no sum launch
        _gemv_down_topk_kernel[(num_tiles_n * num_tokens,)](
            inter_out, w2, w2s, out, topk_ids, topk_weights, num_tokens, inter, h,
            inter_out.stride(0), w2.stride(0), w2.stride(1), w2s.stride(0), w2s.stride(1), out.stride(0),
            USE_FP8=fp8, EVEN_K=inter % down["BLOCK_K"] == 0, BLOCK_N=down["BLOCK_N"], BLOCK_K=down["BLOCK_K"],
            NUM_STAGES=down["num_stages"], PDL=pdl, TOP_K=top_k, TOP_K_PAD=triton.next_power_of_2(top_k),
            num_warps=down["num_warps"], **launch_kwargs(pdl),
        )
        return out
    y = torch.empty(num_pairs, h, dtype=hidden.dtype, device=hidden.device)  # weighted per-pair outputs
    _gemv_down_kernel[(num_tiles_n * num_pairs,)](
        inter_out, w2, w2s, y, topk_ids, topk_weights, out, counters, num_pairs, inter, h,
        inter_out.stride(0), w2.stride(0), w2.stride(1), w2s.stride(0), w2s.stride(1), y.stride(0),
        USE_FP8=fp8, EVEN_K=inter % down["BLOCK_K"] == 0, BLOCK_N=down["BLOCK_N"], BLOCK_K=down["BLOCK_K"],
        NUM_STAGES=down["num_stages"], PDL=pdl, FUSED_SUM=fused_sum,
        TOP_K=top_k if fused_sum else 1, TOP_K_PAD=triton.next_power_of_2(top_k) if fused_sum else 1,
        num_warps=down["num_warps"], **launch_kwargs(pdl),
    )
    if not fused_sum:
        slots = TopKSlots(y, topk_ids)
        if defer_sum:  # the consumer sums (kernels/norm.py: with the residual add and the next norm)
            return slots
        moe_sum(slots, out, pdl)
    return out
