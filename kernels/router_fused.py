"""The router in one launch for decode-sized batches: logits GEMM + scoring + top-k (+ padding mask).

At decode sizes the router GEMM (x [M, H] @ W[E, H]^T, Qwen3-30B-A3B: 128 x 2048 bf16, 0.5 MB) is bound by
launch latency, not bandwidth: cuBLAS ~5 us, then the top-k kernel ~3 us more on an H200. Here the weight is
spread over many programs, each a tile of BLOCK_E experts x one of NUM_SPLITS slices of H for BLOCK_T tokens,
and writes fp32 partial logits to a scratch buffer; the last program of a token block to arrive (a
self-resetting atomic counter per token block) sums that block's partials in a fixed split order (no float
atomics: the same inputs give the same bits every run, so greedy tokens are reproducible) and scores them with
the same helpers as kernels/router.py. One launch instead of two (three for GLM's fp32 router, whose input
cast is folded in too): no second launch's latency, and the logits are read back from L2 by one program.
The counters are shared by every launch on a device: launches on one stream (a model's layers) run one after
another, so each finds them at zero.

Semantics are those of F.linear(x.to(W.dtype), W) followed by the top-k kernels: the summed logits are rounded
to W's dtype (bf16 logits, as cuBLAS returns them) before scoring, so near-ties resolve as on the unfused path.
The grid is a function of shapes only (CUDA graphs): see _fused_config.

The scoring tail is one program's serial chain, so its reductions set its length: at 4 warps and one token each
of top-8's 16 picks (a float max, then an index min) and the softmax max crosses warps through shared memory with
barriers. Its variants (TAIL_CONFIGS, chosen by measurement per row count): fewer warps (at one warp no reduction
leaves the warp) and the packed top-k (kernels/router_packed.py: one integer max per pick over keys (logit, -expert
id), first inside each warp's 32 columns, then among the candidates after one exchange). Both keep the ids, their
order and ties.

route_fused_norm takes the attention output and the residual instead of x and does the post-attention residual add +
RMSNorm itself, bit for bit kernels/norm.py (kernels/router_norm.py): one launch fewer per MoE layer at decode sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import zeroed_counters
from kernels.norm import rms_norm_ref
from kernels.pdl import launch_kwargs, pdl_enabled, pdl_release, pdl_wait
from kernels.router import (
    _check_slots,
    _sigmoid_grouped_top_k,
    _softmax_top_k,
    _store_top_k,
    topk_sigmoid_grouped_ref,
    topk_softmax_ref,
)
from kernels.router_norm import FusedNorm, _inv_rms, _normed_tile, norm_layout
from kernels.router_packed import _softmax_top_k_packed

# the Router takes this path for at most this many rows: the decode batches of issue 16's table up to B=64,
# where the grid is still about one program per SM (4 H splits x 8 expert tiles x 4 token blocks, each
# program 16 KB of weight). Past it the splits fall to 1-2, every program streams whole rows of H for its 16
# tokens and cuBLAS's GEMM tiles start to pay; bench_router.py --m ...,128,256 measures where they cross
FUSED_MAX_TOKENS = 64
# an fp32 router weight (GLM-4.5) streams twice the bytes per row: on the H200 the fused kernel won at 1 and 8
# rows (8.5 vs 22.8 us, 22.1 vs 29.0) and lost from 32 on (37.6 vs 28.3 us, bench_router.py)
FUSED_MAX_TOKENS_FP32 = 8
BLOCK_T = 16  # tokens per program: the smallest tl.dot tile, and the top-k kernels' row block at E <= 256
BLOCK_E = 16  # experts per program
# up to this many rows the products are summed in registers ([rows, BLOCK_E, BLOCK_H] fp32, 16-64 values a
# thread): no shared-memory staging for a 16-row tl.dot tile that is mostly padding
GEMV_MAX_TOKENS = 4
MAX_PARTIAL_BYTES = 32 << 10  # fp32 partials one token block's last program reads: one short serial tail
# the variants bench_router.py --tails times (today's behaviour by default), per row count of softmax routing (the
# grouped sigmoid one keeps the default): (up to this many rows, config), the first that covers the batch applies;
# past the last one, the default. "num_warps" of the launch (the scoring tail's reductions cross warps through
# shared memory and a barrier each, 18 of them at top-8 and one row; with one warp none do), "packed" softmax
# top-k (_softmax_top_k_packed: one integer max per pick)
TAIL_DEFAULT = {"num_warps": 4, "packed": False}
# Measured on an H200 (bench_router.py --shapes qwen3 --tails 4,4p,2p,1,1p, 2026-11-30; us per fused router, the
# default first): M=1 6.74 -> 3.36 (1 warp, packed), M=2 5.88 -> 4.41 (1p), M=4 4.88 (default best), M=8 5.22 -> 4.95
# (4p), M=16 6.89 -> 5.96 (4p), M=64 6.97 -> 6.02 (4p); the same ids in every variant
TAIL_CONFIGS: tuple[tuple[int, dict], ...] = (
    (2, {"num_warps": 1, "packed": True}),
    (4, TAIL_DEFAULT),
    (FUSED_MAX_TOKENS, {"num_warps": 4, "packed": True}),
)


def tail_config(num_tokens: int) -> dict:
    return next((cfg for rows, cfg in TAIL_CONFIGS if num_tokens <= rows), TAIL_DEFAULT)


def route_fused_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [num_experts, hidden]
    top_k: int,
    renormalize: bool,
    slots: torch.Tensor | None = None,  # [num_tokens] int: a row whose slot is < 0 is padding, its ids -1
    correction_bias: torch.Tensor | None = None,  # [num_experts] fp32: sigmoid grouped scoring (GLM-4.5)
    num_groups: int = 1,
    topk_groups: int = 1,
    routed_scaling_factor: float = 1.0,
    num_splits: int | None = None,  # the fused kernel's H split (A/B and tests); unused here
    gemv: bool | None = None,  # the fused kernel's GEMM form (A/B and tests); unused here
    num_warps: int | None = None,  # the fused kernel's tail variants (A/B and tests); unused here
    packed: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k (no correction_bias) or biased sigmoid group-limited top-k of x @ weight^T.
    Returns weights fp32 [T, k] and ids int32 [T, k]."""
    _check_inputs(x, weight, correction_bias)
    logits = F.linear(x.to(weight.dtype), weight)  # [T, E] in weight's dtype
    if correction_bias is None:
        return topk_softmax_ref(logits, top_k, renormalize, slots)
    return topk_sigmoid_grouped_ref(logits, correction_bias, top_k, num_groups, topk_groups, renormalize,
                                    routed_scaling_factor, slots)


# ---------------------------------------------------------------- Triton kernel


@triton.jit
def _x_tile(x_ptr, t, tmask, h, stride_x, HIDDEN: tl.constexpr):
    # [GEMM_T, BLOCK_H] activations of the tokens t at columns h
    return tl.load(x_ptr + t.to(tl.int64)[:, None] * stride_x + h[None, :], mask=tmask[:, None] & (h < HIDDEN)[None, :],
                   other=0.0)


@triton.jit
def _in_tile(x_ptr, res_ptr, nw_ptr, x_out_ptr, r_out_ptr, inv, t, tmask, h, pid_e, stride_x, stride_r,
             HIDDEN: tl.constexpr, NORM: tl.constexpr):
    # the GEMM's activations at columns h: x itself, or (NORM) the normalized h + res, stored in turns on the way
    if NORM:
        return _normed_tile(x_ptr, res_ptr, nw_ptr, x_out_ptr, r_out_ptr, inv, t, tmask, h, pid_e,
                            tl.num_programs(0), stride_x, stride_r, HIDDEN)
    else:
        return _x_tile(x_ptr, t, tmask, h, stride_x, HIDDEN)


@triton.jit
def _logits_step(acc, xt, wt, GEMV: tl.constexpr):
    # acc [GEMM_T, BLOCK_E] += xt [GEMM_T, BLOCK_H] @ wt^T ([BLOCK_E, BLOCK_H] router weights)
    # x is cast to W's dtype as F.linear(x.to(W.dtype), W) does; fp32 W (GLM): exact fp32 products, no tf32
    xt = xt.to(wt.dtype)
    if GEMV:
        acc += tl.sum(xt.to(tl.float32)[:, None, :] * wt.to(tl.float32)[None, :, :], 2)
    else:
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
    return acc


# one variant per (split, token block) shape, not per count; slots may be a TP rank's slice at any offset
@triton.jit(do_not_specialize=["num_tokens"], do_not_specialize_on_alignment=["slots_ptr"])
def _route_fused_kernel(
    x_ptr, w_ptr, bias_ptr, partial_ptr, counter_ptr, weights_ptr, ids_ptr, slots_ptr,
    res_ptr, nw_ptr, x_out_ptr, r_out_ptr,
    num_tokens, stride_x, routed_scaling_factor, stride_r, N, eps,
    HIDDEN: tl.constexpr, NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, SIGMOID_GROUPED: tl.constexpr,
    NUM_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_SLOTS: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLIT_H: tl.constexpr, BLOCK_T: tl.constexpr, TAIL_T: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E_ALL: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr, GEMV: tl.constexpr, PDL: tl.constexpr = False, PACKED: tl.constexpr = False,
    KEY16: tl.constexpr = False, GROUP: tl.constexpr = 32, NORM: tl.constexpr = False, NORM_BLOCK: tl.constexpr = 1,
    NORM_W: tl.constexpr = 0, LOG_W: tl.constexpr = 0, REPS: tl.constexpr = 0,
):
    # NORM (route_fused_norm): x_ptr holds the attention output h and res_ptr the residual; the logits are of
    # x = rms_norm(h + res) * nw (kernels/router_norm.py), written with r = h + res to x_out / r_out
    # grid (expert tiles, H splits, token blocks)
    pid_e, pid_s, pid_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # GEMV (a few tokens, one token block): TAIL_T rows of products summed in registers; else a BLOCK_T-row dot
    GEMM_T: tl.constexpr = TAIL_T if GEMV else BLOCK_T
    tt = tl.arange(0, GEMM_T)
    t = pid_t * BLOCK_T + tt
    tmask = t < num_tokens
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e < NUM_EXPERTS
    acc = tl.zeros([GEMM_T, BLOCK_E], tl.float32)
    h_start = pid_s * SPLIT_H
    if PDL:
        # the split's first weight tile is no kernel's output: read it while the predecessor drains (kernels/pdl.py);
        # x, slots and the counters only after the wait
        h = h_start + tl.arange(0, BLOCK_H)
        wt = tl.load(w_ptr + e[:, None] * HIDDEN + h[None, :], mask=emask[:, None] & (h < HIDDEN)[None, :], other=0.0)
        pdl_wait(PDL)
        pdl_release(PDL)
    inv = tl.zeros([GEMM_T], tl.float32)
    if NORM:  # [GEMM_T] the rows' rsqrt(mean(r^2) + eps): every program sums its whole rows (router_norm.py)
        # over TAIL_T rows (all of them where that is less than a token block: one block), repeated to GEMM_T
        inv = _inv_rms(x_ptr, res_ptr, pid_t * BLOCK_T, num_tokens, stride_x, stride_r, N, eps, TAIL_T, NORM_BLOCK,
                       NORM_W, LOG_W, REPS)
        inv = tl.reshape(tl.broadcast_to(inv[None, :], [GEMM_T // TAIL_T, TAIL_T]), [GEMM_T])
    if PDL:
        xt = _in_tile(x_ptr, res_ptr, nw_ptr, x_out_ptr, r_out_ptr, inv, t, tmask, h, pid_e, stride_x, stride_r,
                      HIDDEN, NORM)
        acc = _logits_step(acc, xt, wt, GEMV)
        h_start += BLOCK_H
    for h0 in range(h_start, pid_s * SPLIT_H + SPLIT_H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        xt = _in_tile(x_ptr, res_ptr, nw_ptr, x_out_ptr, r_out_ptr, inv, t, tmask, h, pid_e, stride_x, stride_r,
                      HIDDEN, NORM)
        wt = tl.load(w_ptr + e[:, None] * HIDDEN + h[None, :], mask=emask[:, None] & (h < HIDDEN)[None, :], other=0.0)
        acc = _logits_step(acc, xt, wt, GEMV)
    # partials [token blocks, NUM_SPLITS, BLOCK_T, BLOCK_E_ALL] fp32; only real token rows are written and read
    rows = (pid_t * NUM_SPLITS + pid_s) * BLOCK_T + tt
    tl.store(partial_ptr + rows[:, None] * BLOCK_E_ALL + e[None, :], acc, mask=tmask[:, None] & emask[None, :])
    # every thread's partial stores precede the counter's release; the token block's last program scores it
    tl.debug_barrier()
    counter = counter_ptr + pid_t
    if tl.atomic_add(counter, 1, sem="acq_rel") == tl.num_programs(0) * NUM_SPLITS - 1:
        # scored in a [TAIL_T, BLOCK_E_ALL] tile: TAIL_T covers the block's rows (next power of two of a small
        # batch: one token scores one row, not sixteen)
        rt = tl.arange(0, TAIL_T)
        tail_t = pid_t * BLOCK_T + rt
        tail_mask = tail_t < num_tokens
        ec = tl.arange(0, BLOCK_E_ALL)[None, :]
        k = tl.arange(0, BLOCK_K)[None, :]
        lmask = tail_mask[:, None] & (ec < NUM_EXPERTS)
        logits = tl.zeros([TAIL_T, BLOCK_E_ALL], tl.float32)
        for s in tl.static_range(NUM_SPLITS):  # a fixed order: deterministic sums
            tail_rows = (pid_t * NUM_SPLITS + s) * BLOCK_T + rt
            # .cg: the other programs' partials were written by other SMs, never through this SM's L1
            logits += tl.load(partial_ptr + tail_rows[:, None] * BLOCK_E_ALL + ec, mask=lmask, other=0.0,
                              cache_modifier=".cg")
        logits = logits.to(w_ptr.dtype.element_ty).to(tl.float32)  # the logits F.linear would return
        if SIGMOID_GROUPED:
            bias = tl.load(bias_ptr + ec, mask=ec < NUM_EXPERTS, other=0.0).to(tl.float32)
            top_vals, top_ids = _sigmoid_grouped_top_k(logits, bias, ec, k, routed_scaling_factor, NUM_EXPERTS,
                                                       TOP_K, NUM_GROUPS, TOPK_GROUPS, RENORMALIZE, TAIL_T,
                                                       BLOCK_K, BLOCK_G)
        else:
            logits = tl.where(ec < NUM_EXPERTS, logits, float("-inf"))
            if PACKED:
                top_vals, top_ids = _softmax_top_k_packed(logits, ec, k, TOP_K, RENORMALIZE, TAIL_T, BLOCK_K, KEY16,
                                                          GROUP)
            else:
                top_vals, top_ids = _softmax_top_k(logits, ec, k, TOP_K, RENORMALIZE, TAIL_T, BLOCK_K)
        _store_top_k(weights_ptr, ids_ptr, slots_ptr, top_vals, top_ids, tail_t, tail_mask, k, TOP_K, HAS_SLOTS)
        tl.atomic_xchg(counter, 0)  # ready for the next launch (CUDA graph replays reuse the buffer)


# ---------------------------------------------------------------- checked wrapper


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, correction_bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [num_tokens, hidden] with contiguous rows, got {tuple(x.shape)} "
                         f"strides {x.stride()}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous [num_experts, hidden={x.shape[1]}], got {tuple(weight.shape)}")
    if correction_bias is not None and (correction_bias.shape != (weight.shape[0],)
                                        or not correction_bias.is_contiguous()):
        raise ValueError(f"correction_bias must be contiguous [{weight.shape[0]}], got {tuple(correction_bias.shape)}")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _fused_config(num_tokens: int, num_experts: int, hidden: int, num_sms: int) -> tuple[int, int]:
    """(num_splits, BLOCK_H) from shapes only. About one program per SM in all (a program per SM hides DRAM
    latency with one tile in flight; more programs only queue), splits a power of two so that few variants
    compile, and at most MAX_PARTIAL_BYTES of partials per token block for its last program to sum.
    Qwen3-30B-A3B (E=128, H=2048) on 132 SMs: M=1..4 16 splits (128 programs of 16 x 128 weights, 8-32 KB of
    partials), M=5..8 8 splits, M=9..64 4 splits per token block."""
    num_tiles = triton.cdiv(num_experts, BLOCK_E) * triton.cdiv(num_tokens, BLOCK_T)
    rows = min(num_tokens, BLOCK_T)
    splits = 1
    while (splits * 2 * num_tiles <= num_sms and splits * 2 * rows * BLOCK_E * triton.cdiv(num_experts, BLOCK_E) * 4
           <= MAX_PARTIAL_BYTES and hidden >= splits * 2 * 32):
        splits *= 2
    return splits, min(128, max(16, triton.next_power_of_2(triton.cdiv(hidden, splits))))


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def route_fused(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [num_experts, hidden]
    top_k: int,
    renormalize: bool,
    slots: torch.Tensor | None = None,  # [num_tokens] int: a row whose slot is < 0 is padding, its ids -1
    correction_bias: torch.Tensor | None = None,  # [num_experts] fp32: sigmoid grouped scoring (GLM-4.5)
    num_groups: int = 1,
    topk_groups: int = 1,
    routed_scaling_factor: float = 1.0,
    num_splits: int | None = None,  # H split; None: _fused_config's choice
    gemv: bool | None = None,  # products summed in registers, not tl.dot; None: up to GEMV_MAX_TOKENS rows
    ids_out: torch.Tensor | None = None,  # [num_tokens, top_k] int32 contiguous: the ids written here
    num_warps: int | None = None,  # None: tail_config's
    packed: bool | None = None,  # the softmax top-k by packed keys (not the grouped scoring); None: tail_config's
) -> tuple[torch.Tensor, torch.Tensor]:
    return _route(x, weight, top_k, renormalize, slots, correction_bias, num_groups, topk_groups, routed_scaling_factor,
                  num_splits, gemv, ids_out, num_warps, packed)


def _route(x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool, slots: torch.Tensor | None,
           correction_bias: torch.Tensor | None, num_groups: int, topk_groups: int, routed_scaling_factor: float,
           num_splits: int | None, gemv: bool | None, ids_out: torch.Tensor | None, num_warps: int | None,
           packed: bool | None, norm: FusedNorm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # norm: x is the attention output h, normalized with norm.residual inside (route_fused_norm)
    _check_inputs(x, weight, correction_bias)
    # (TAIL_CONFIGS is for softmax routing, what bench_router.py --shapes qwen3 measures; grouped: the default)
    tail = tail_config(x.shape[0]) if correction_bias is None else TAIL_DEFAULT
    num_warps = tail["num_warps"] if num_warps is None else num_warps
    packed = tail["packed"] if packed is None else packed
    if num_warps not in (1, 2, 4, 8):
        raise ValueError(f"num_warps must be 1, 2, 4 or 8, got {num_warps}")
    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    if slots is not None:
        _check_slots(slots, num_tokens)
    grouped = correction_bias is not None
    if grouped and (num_experts % num_groups or not 0 < topk_groups <= num_groups):
        raise ValueError(f"num_groups={num_groups} must divide num_experts={num_experts} and "
                         f"topk_groups={topk_groups} be in [1, num_groups]")
    if gemv and num_tokens > BLOCK_T:
        raise ValueError(f"gemv takes at most {BLOCK_T} rows, got {num_tokens}")
    if grouped and top_k > topk_groups * (num_experts // num_groups):
        raise ValueError(f"top_k={top_k} exceeds the experts of the {topk_groups} chosen groups")
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=x.device)
    if ids_out is not None and (ids_out.shape != (num_tokens, top_k) or ids_out.dtype != torch.int32
                                or not ids_out.is_contiguous() or ids_out.device != x.device):
        raise ValueError(f"ids_out must be a contiguous int32 [{num_tokens}, {top_k}] tensor on {x.device}, got "
                         f"{ids_out.dtype} {tuple(ids_out.shape)} on {ids_out.device}")
    ids = ids_out if ids_out is not None else torch.empty(num_tokens, top_k, dtype=torch.int32, device=x.device)
    if num_tokens == 0:
        return weights, ids
    splits, block_h = _fused_config(num_tokens, num_experts, hidden, _num_sms(x.device))
    if num_splits is not None:
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        splits, block_h = num_splits, min(128, max(16, triton.next_power_of_2(triton.cdiv(hidden, num_splits))))
    split_h = triton.cdiv(triton.cdiv(hidden, splits), block_h) * block_h  # a whole number of BLOCK_H steps
    num_e_tiles, num_t_blocks = triton.cdiv(num_experts, BLOCK_E), triton.cdiv(num_tokens, BLOCK_T)
    block_e_all = triton.next_power_of_2(num_e_tiles * BLOCK_E)  # the last program's tile of all experts
    partials = torch.empty(num_t_blocks * splits * BLOCK_T, block_e_all, dtype=torch.float32, device=x.device)
    # arrivals per token block; 64 covers 1024 rows, so the Router's sizes never grow (replace) the buffer
    counters = zeroed_counters(_COUNTERS, num_t_blocks, x.device, 64)
    pdl = pdl_enabled(x.device)
    _route_fused_kernel[(num_e_tiles, splits, num_t_blocks)](
        x, weight, correction_bias if grouped else weight, partials, counters, weights, ids,
        slots if slots is not None else ids,
        *((norm.residual, norm.weight, norm.x_out, norm.r_out) if norm is not None else (x, x, x, x)),
        num_tokens, x.stride(0), float(routed_scaling_factor),
        norm.residual.stride(0) if norm is not None else 0, hidden, float(norm.eps) if norm is not None else 0.0,
        HIDDEN=hidden, NUM_EXPERTS=num_experts, TOP_K=top_k, SIGMOID_GROUPED=grouped, NUM_GROUPS=num_groups,
        TOPK_GROUPS=topk_groups, RENORMALIZE=renormalize, HAS_SLOTS=slots is not None, NUM_SPLITS=splits,
        SPLIT_H=split_h, BLOCK_T=BLOCK_T, TAIL_T=min(BLOCK_T, triton.next_power_of_2(num_tokens)), BLOCK_E=BLOCK_E,
        BLOCK_H=block_h, BLOCK_E_ALL=block_e_all, BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_G=triton.next_power_of_2(num_groups), GEMV=num_tokens <= GEMV_MAX_TOKENS if gemv is None else gemv,
        PDL=pdl, PACKED=bool(packed), KEY16=weight.dtype == torch.bfloat16 and block_e_all <= 1 << 16,
        # one warp: each thread holds several columns, so one group of all (its picks are the answer); more: a group
        # per warp's 32 lanes
        GROUP=block_e_all if num_warps == 1 else min(32, block_e_all), num_warps=num_warps, **launch_kwargs(pdl),
        **(norm.constexprs(hidden) if norm is not None else {}),
    )
    return weights, ids


def route_fused_norm(
    h: torch.Tensor,  # [num_tokens, hidden] the attention output
    residual: torch.Tensor,  # [num_tokens, hidden]
    norm_weight: torch.Tensor,  # [hidden] the post-attention RMSNorm's
    eps: float,
    weight: torch.Tensor,  # [num_experts, hidden]
    top_k: int,
    renormalize: bool,
    slots: torch.Tensor | None = None,
    correction_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    routed_scaling_factor: float = 1.0,
    num_splits: int | None = None,
    gemv: bool | None = None,
    ids_out: torch.Tensor | None = None,
    num_warps: int | None = None,
    packed: bool | None = None,
    layout: tuple[int, int, int] | None = None,  # the sum of squares' order (tests); None: norm_layout's
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """kernels/norm.py rms_norm(h, norm_weight, eps, residual) -> (x, r), then route_fused(x, ...), in one launch:
    returns (weights, ids, x, r), bit for bit the two kernels' (kernels/router_norm.py)."""
    _check_inputs(h, weight, correction_bias)
    if residual.shape != h.shape or residual.stride(1) != 1 or residual.dtype != h.dtype:
        raise ValueError(f"residual must be {h.dtype} {tuple(h.shape)} with contiguous rows, got {residual.dtype} "
                         f"{tuple(residual.shape)}")
    if norm_weight.shape != (h.shape[1],) or not norm_weight.is_contiguous():
        raise ValueError(f"norm_weight must be contiguous [{h.shape[1]}], got {tuple(norm_weight.shape)}")
    layout = norm_layout(h.shape[1], h.dtype, h.device) if layout is None else layout
    if layout is None:
        raise ValueError(f"the router's norm has no known sum order for hidden {h.shape[1]} {h.dtype} on "
                         f"{h.device}: use rms_norm, then route_fused")
    x_out = torch.empty(h.shape, dtype=torch.promote_types(h.dtype, norm_weight.dtype), device=h.device)
    r_out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    norm = FusedNorm(residual, norm_weight, eps, x_out, r_out, layout)
    weights, ids = _route(h, weight, top_k, renormalize, slots, correction_bias, num_groups, topk_groups,
                          routed_scaling_factor, num_splits, gemv, ids_out, num_warps, packed, norm)
    return weights, ids, x_out, r_out


def route_fused_norm_ref(
    h: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    top_k: int,
    renormalize: bool,
    slots: torch.Tensor | None = None,
    correction_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    routed_scaling_factor: float = 1.0,
    num_splits: int | None = None,  # the fused kernel's variants (A/B and tests); unused here
    gemv: bool | None = None,
    ids_out: torch.Tensor | None = None,
    num_warps: int | None = None,
    packed: bool | None = None,
    layout: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """rms_norm_ref then route_fused_ref: (weights, ids, x, h + residual)."""
    x, r = rms_norm_ref(h, norm_weight, eps, residual)
    weights, ids = route_fused_ref(x, weight, top_k, renormalize, slots, correction_bias, num_groups, topk_groups,
                                   routed_scaling_factor)
    return weights, ids, x, r
