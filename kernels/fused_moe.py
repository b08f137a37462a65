"""Fused MoE experts: a grouped GEMM over (token, slot) pairs sorted by expert.

fused_experts runs: moe_align (kernels/moe_align.py) -> gate_up GEMM with SiLU-and-mul in its epilogue
-> down GEMM with the router weight in its epilogue -> a top-k sum. One token needs no align, and with
config["fused_sum"] the down GEMM does the top-k sum too (the last slot to finish a column tile sums it).
The FP8 path takes e4m3 weights with fp32 [128, 128] block scales (w13_scale, w2_scale in the HF
weight_scale_inv layout) and quantizes the activations per token and 128 channels on the fly, or (act_fp8
false, few rows) keeps them 16-bit: each GEMM's "w8_mma" then picks how weights meet them (kernels/moe_w8.py).
At many rows (config["tma"], from a tuned table) the experts take kernels/moe_grouped_tma.py instead. Which path a
call takes, what it compiles and allocates: kernels/moe_plan.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.fp8 import (
    FP8_BLOCK,
    dequantize_weight_block,
    f16_pow2_split,
    per_token_group_quant,
    per_token_group_quant_ref,
)
from kernels.moe_align import moe_align
from kernels.moe_config import get_moe_config
from kernels.moe_gemv import gemv_experts
from kernels.moe_grouped_tma import fused_experts_tma, tma_supported
from kernels.moe_plan import experts_path
from kernels.moe_sum import TopKSlots, _one_token_sum, _sum_counters, moe_sum
from kernels.moe_w8 import w8_f16_dot, w8_mma_meta
from kernels.pdl import launch_kwargs, pdl_enabled, pdl_release, pdl_wait
from kernels.tiles import grouped_tile


def fused_experts_ref(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * inter, hidden]  (gate rows then up rows)
    w2: torch.Tensor,  # [num_experts, hidden, inter]
    topk_weights: torch.Tensor,  # [num_tokens, top_k] fp32
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int, -1 = slot not handled here
    *,
    w13_scale: torch.Tensor | None = None,  # FP8: [E, ceil(2I/128), ceil(H/128)] fp32
    w2_scale: torch.Tensor | None = None,  # FP8: [E, ceil(H/128), ceil(I/128)] fp32
    act_fp8: bool = True,
) -> torch.Tensor:
    """sum_k w[t,k] * down(silu(gate(x_t)) * up(x_t)) over the token's experts; [num_tokens, hidden].

    FP8: dequantized weights, and (act_fp8) activations rounded through the same per-token-group FP8
    quantization as the kernel, so that the two differ only by accumulation order."""
    if w13_scale is not None and w2_scale is not None:
        w13 = dequantize_weight_block(w13, w13_scale, hidden.dtype)
        w2 = dequantize_weight_block(w2, w2_scale, hidden.dtype)
        fp8_round = _fp8_round_trip if act_fp8 else (lambda x: x)
    else:
        fp8_round = lambda x: x
    num_tokens, top_k = topk_ids.shape
    out = torch.zeros(num_tokens, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.reshape(-1)
    for e in flat_ids[flat_ids >= 0].unique().tolist():
        token_ids, slot_ids = (topk_ids == e).nonzero(as_tuple=True)
        x = fp8_round(hidden[token_ids])
        gate, up = (x @ w13[e].t()).chunk(2, dim=-1)
        y = fp8_round((F.silu(gate.float()) * up.float()).to(hidden.dtype)) @ w2[e].t()
        out.index_add_(0, token_ids, y.float() * topk_weights[token_ids, slot_ids, None])
    return out.to(hidden.dtype)


def _fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    q, scale = per_token_group_quant_ref(x)
    return (q.float() * scale.repeat_interleave(FP8_BLOCK, dim=-1)[..., : x.shape[-1]]).to(x.dtype)


# ---------------------------------------------------------------- Triton kernels


@triton.jit
def _tile_ids(NUM_PID_M, NUM_PID_N, GROUP_M: tl.constexpr):
    return grouped_tile(tl.program_id(0), NUM_PID_M, NUM_PID_N, GROUP_M)


@triton.jit
def _block_rows(sorted_ptr, expert_ids_ptr, num_post_pad_ptr, pid_m, num_pairs, DIRECT: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """(expert or -1 to skip, sorted positions [BLOCK_M], pair ids [BLOCK_M]; num_pairs = padding row)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if DIRECT:
        # no align (one token): block pid_m holds pair pid_m alone and expert_ids_ptr is topk_ids itself
        e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        pair = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_pairs)
    else:
        e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        e = tl.where(pid_m * BLOCK_M < tl.load(num_post_pad_ptr), e, -1)
        pair = tl.load(sorted_ptr + offs_m)
    return e, offs_m, pair


@triton.jit(do_not_specialize=["num_pairs", "NUM_PID_M", "top_k"])
def _moe_up_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, out_ptr, sorted_ptr, expert_ids_ptr, num_post_pad_ptr,
    num_pairs, K, INTER, NUM_PID_M, top_k,
    stride_at, stride_ast, stride_we, stride_wn, stride_wse, stride_wsn, stride_ot,
    USE_FP8: tl.constexpr, ACT_FP8: tl.constexpr, EVEN_K: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PDL: tl.constexpr = False, F16_MMA: tl.constexpr = False, SWAP_AB: tl.constexpr = False,
    WIDEN_ASM: tl.constexpr = False,
):
    # out[p, n] = silu(a[tok(p)] . w[e, n]) * (a[tok(p)] . w[e, INTER + n]) for sorted position p
    pid_m, pid_n = _tile_ids(NUM_PID_M, tl.cdiv(INTER, BLOCK_N), GROUP_M)
    pdl_wait(PDL)  # the weights to read follow the align's (or router's) expert ids: nothing before (kernels/pdl.py)
    pdl_release(PDL)
    e, offs_m, pair = _block_rows(sorted_ptr, expert_ids_ptr, num_post_pad_ptr, pid_m, num_pairs, DIRECT, BLOCK_M)
    if e < 0:
        return
    rmask = pair < num_pairs
    tok = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < INTER
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + tok[:, None] * stride_at + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    wg_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    wu_ptrs = wg_ptrs + INTER * stride_wn  # [BLOCK_K, BLOCK_N] gate / up rows of w13[e]
    if USE_FP8:
        as_ptrs = a_scale_ptr + tok * stride_ast  # [BLOCK_M] per-token group scales (ACT_FP8)
        wsg_ptrs = w_scale_ptr + e * stride_wse + (offs_n // 128) * stride_wsn  # [BLOCK_N]
        wsu_ptrs = w_scale_ptr + e * stride_wse + ((offs_n + INTER) // 128) * stride_wsn
    if F16_MMA:  # the scales meet the product, not a dot operand: the pipeliner would leave their loads synchronous
        wg_s = tl.load(wsg_ptrs, mask=nmask, other=0.0)  # so each step's are fetched a step ahead
        wu_s = tl.load(wsu_ptrs, mask=nmask, other=0.0)
    if SWAP_AB:  # out^T tiles (F16_MMA only)
        acc_g = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
            wg = tl.load(wg_ptrs, mask=nmask[None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=nmask[None, :], other=0.0)
        else:
            kmask = offs_k + k0 < K
            a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if F16_MMA:  # weight-only FP8, widened to fp16, scaled after the dot (kernels/moe_w8.py)
            kn = k0 + BLOCK_K
            wg_s_next = tl.load(wsg_ptrs + kn // 128, mask=nmask & (kn < K), other=0.0)
            wu_s_next = tl.load(wsu_ptrs + kn // 128, mask=nmask & (kn < K), other=0.0)
            a16, a16_s = f16_pow2_split(a)
            acc_g += w8_f16_dot(a16, a16_s, wg, wg_s, WIDEN_ASM, SWAP_AB)
            acc_u += w8_f16_dot(a16, a16_s, wu, wu_s, WIDEN_ASM, SWAP_AB)
            wg_s, wu_s = wg_s_next, wu_s_next
        elif USE_FP8:
            wg_s = tl.load(wsg_ptrs + k0 // 128, mask=nmask, other=0.0)
            wu_s = tl.load(wsu_ptrs + k0 // 128, mask=nmask, other=0.0)
            if ACT_FP8:
                a_s = tl.load(as_ptrs + k0 // 128, mask=rmask, other=0.0)
                acc_g += tl.dot(a, wg) * a_s[:, None] * wg_s[None, :]
                acc_u += tl.dot(a, wu) * a_s[:, None] * wu_s[None, :]
            else:  # weight-only: dequantize the tile in registers, 16-bit MMA (few rows: bandwidth-bound)
                acc_g = tl.dot(a, (wg.to(tl.float32) * wg_s[None, :]).to(a.dtype), acc_g)
                acc_u = tl.dot(a, (wu.to(tl.float32) * wu_s[None, :]).to(a.dtype), acc_u)
        else:
            acc_g = tl.dot(a, wg, acc_g)
            acc_u = tl.dot(a, wu, acc_u)
        a_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    if SWAP_AB:
        h = tl.trans(h)
    o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


@triton.jit(do_not_specialize=["num_pairs", "NUM_PID_M"])
def _moe_down_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, out_ptr, sorted_ptr, expert_ids_ptr, num_post_pad_ptr,
    topk_weights_ptr, sum_ptr, counter_ptr, num_pairs, K, N, NUM_PID_M,
    stride_at, stride_ast, stride_we, stride_wn, stride_wse, stride_wsn, stride_ot,
    USE_FP8: tl.constexpr, ACT_FP8: tl.constexpr, EVEN_K: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FUSED_SUM: tl.constexpr, TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr, PDL: tl.constexpr = False,
    F16_MMA: tl.constexpr = False, SWAP_AB: tl.constexpr = False, WIDEN_ASM: tl.constexpr = False,
):
    # out[pair(p), n] = topk_weight[pair(p)] * a[p] . w[e, n]; a is indexed by sorted position p.
    # FUSED_SUM (DIRECT only, so one token): also sum_ptr[n] = sum over the handled slots of out[slot, n]
    pid_m, pid_n = _tile_ids(NUM_PID_M, tl.cdiv(N, BLOCK_N), GROUP_M)
    pdl_wait(PDL)  # a is the up kernel's output, the weights follow the expert ids (kernels/pdl.py)
    pdl_release(PDL)
    e, offs_m, pair = _block_rows(sorted_ptr, expert_ids_ptr, num_post_pad_ptr, pid_m, num_pairs, DIRECT, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    if FUSED_SUM:
        kk = tl.arange(0, TOP_K_PAD)  # expert_ids_ptr is topk_ids [1, TOP_K] here
        num_handled = tl.sum((tl.load(expert_ids_ptr + kk, mask=kk < TOP_K, other=-1) >= 0).to(tl.int32), 0)
        if num_handled == 0:  # no slot of the token is handled here: its sum is zero, written by slot 0
            if pid_m == 0:
                zero = tl.zeros([BLOCK_N], tl.float32).to(sum_ptr.dtype.element_ty)
                tl.store(sum_ptr + offs_n, zero, mask=nmask)
    if e < 0:
        return
    rmask = pair < num_pairs
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_at + offs_k[None, :]
    w_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    if USE_FP8:
        as_ptrs = a_scale_ptr + offs_m.to(tl.int64) * stride_ast
        ws_ptrs = w_scale_ptr + e * stride_wse + (offs_n // 128) * stride_wsn
    if F16_MMA:  # fetched a step ahead (see the up kernel)
        w_s = tl.load(ws_ptrs, mask=nmask, other=0.0)
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=nmask[None, :], other=0.0)
        else:
            kmask = offs_k + k0 < K
            a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if F16_MMA:  # silu(g) * u may exceed fp16's range: f16_pow2_split's row scales keep it exact
            kn = k0 + BLOCK_K
            w_s_next = tl.load(ws_ptrs + kn // 128, mask=nmask & (kn < K), other=0.0)
            a16, a16_s = f16_pow2_split(a)
            acc += w8_f16_dot(a16, a16_s, w, w_s, WIDEN_ASM, SWAP_AB)
            w_s = w_s_next
        elif USE_FP8:
            w_s = tl.load(ws_ptrs + k0 // 128, mask=nmask, other=0.0)
            if ACT_FP8:
                a_s = tl.load(as_ptrs + k0 // 128, mask=rmask, other=0.0)
                acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
            else:
                acc = tl.dot(a, (w.to(tl.float32) * w_s[None, :]).to(a.dtype), acc)
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SWAP_AB:
        acc = tl.trans(acc)
    acc *= tl.load(topk_weights_ptr + pair, mask=rmask, other=0.0)[:, None]
    o_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])
    if FUSED_SUM:
        _one_token_sum(out_ptr, expert_ids_ptr, sum_ptr, counter_ptr, pid_n, offs_n, nmask, num_handled, N, TOP_K,
                       BLOCK_N)


# ---------------------------------------------------------------- checked wrappers


def _check_moe(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale) -> bool:
    num_tokens, h = hidden.shape
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[2] != h or w2.shape[1] != h or w13.shape[1] != 2 * w2.shape[2]:
        raise ValueError(f"expert weights must be w13 [E, 2I, H], w2 [E, H, I]; got {tuple(w13.shape)}, "
                         f"{tuple(w2.shape)} for hidden {tuple(hidden.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} / topk_weights {tuple(topk_weights.shape)} must be "
                         f"[{num_tokens}, top_k]")
    if topk_weights.dtype != torch.float32 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_weights must be fp32 and topk_ids int32/int64, got {topk_weights.dtype}, "
                         f"{topk_ids.dtype}")
    for name, t in (("hidden", hidden), ("w13", w13), ("w2", w2), ("topk_weights", topk_weights),
                    ("topk_ids", topk_ids)):
        if not t.is_contiguous():
            raise ValueError(f"fused_experts needs a contiguous {name}")
    fp8 = w13_scale is not None or w2_scale is not None
    if fp8:
        e, n13, _ = w13.shape
        want13 = (e, triton.cdiv(n13, FP8_BLOCK), triton.cdiv(h, FP8_BLOCK))
        want2 = (e, triton.cdiv(h, FP8_BLOCK), triton.cdiv(w2.shape[2], FP8_BLOCK))
        if w13_scale is None or w2_scale is None or tuple(w13_scale.shape) != want13 \
                or tuple(w2_scale.shape) != want2:
            raise ValueError(f"FP8 experts need w13_scale {want13} and w2_scale {want2} (128x128 blocks)")
        if w13.dtype != torch.float8_e4m3fn or w2.dtype != torch.float8_e4m3fn:
            raise ValueError(f"FP8 experts need e4m3 weights, got {w13.dtype}, {w2.dtype}")
        if any(t.dtype != torch.float32 or not t.is_contiguous() for t in (w13_scale, w2_scale)):
            raise ValueError("FP8 scales must be contiguous fp32")
    elif w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise ValueError(f"dtype mismatch: hidden {hidden.dtype}, w13 {w13.dtype}, w2 {w2.dtype}")
    return fp8


def moe_dtype_name(hidden: torch.Tensor, fp8: bool) -> str:
    return "fp8" if fp8 else str(hidden.dtype).removeprefix("torch.")


def fused_experts_aligned(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
    topk_ids: torch.Tensor, sorted_ids: torch.Tensor | None, expert_ids: torch.Tensor | None,
    num_post_pad: torch.Tensor | None,
    config: dict, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
    defer_sum: bool = False,
) -> torch.Tensor | TopKSlots:
    """The GEMMs and the top-k sum, given moe_align's outputs for config["BLOCK_M"] (unchecked).

    sorted_ids None: the one-token path, one (token, slot) pair per block and no align at all."""
    num_tokens, h = hidden.shape
    top_k = topk_ids.shape[1]
    inter = w2.shape[2]
    fp8 = w13_scale is not None
    act_fp8 = fp8 and config.get("act_fp8", True)  # False: fp8 weights, 16-bit activations (W8A16)
    bm = config["BLOCK_M"]
    num_pairs = num_tokens * top_k
    direct = sorted_ids is None
    if direct:
        num_pid_m, sorted_ids, expert_ids, num_post_pad = num_pairs, topk_ids, topk_ids, topk_ids
    else:
        num_pid_m = sorted_ids.numel() // bm
    up, down = config["up"], config["down"]
    a, a_scale = per_token_group_quant(hidden) if act_fp8 else (hidden, hidden)  # (a_scale unused if not)
    w13s, w2s = (w13_scale, w2_scale) if fp8 else (w13, w2)
    inter_out = torch.empty(num_pid_m * bm, inter, dtype=hidden.dtype, device=hidden.device)
    pdl = pdl_enabled(hidden.device)
    _moe_up_kernel[(num_pid_m * triton.cdiv(inter, up["BLOCK_N"]),)](
        a, a_scale, w13, w13s, inter_out, sorted_ids, expert_ids, num_post_pad,
        num_pairs, h, inter, num_pid_m, top_k,
        a.stride(0), a_scale.stride(0), w13.stride(0), w13.stride(1), w13s.stride(0), w13s.stride(1),
        inter_out.stride(0),
        USE_FP8=fp8, ACT_FP8=act_fp8, EVEN_K=h % up["BLOCK_K"] == 0, DIRECT=direct, BLOCK_M=bm, BLOCK_N=up["BLOCK_N"],
        BLOCK_K=up["BLOCK_K"], GROUP_M=up["GROUP_M"], PDL=pdl, num_warps=up["num_warps"],
        num_stages=up["num_stages"], **w8_mma_meta(up, fp8, act_fp8, hidden.device), **launch_kwargs(pdl),
    )
    a, a_scale = per_token_group_quant(inter_out) if act_fp8 else (inter_out, inter_out)
    y = torch.empty(num_pairs, h, dtype=hidden.dtype, device=hidden.device)  # weighted per-pair outputs
    out = torch.empty_like(hidden)
    num_tiles_n = triton.cdiv(h, down["BLOCK_N"])
    # one token: the down GEMM's last slot per column tile may do the top-k sum (config "fused_sum", an A/B
    # switch: one launch fewer, a serial tail in the GEMM instead)
    fused_sum = direct and bool(config.get("fused_sum", False))
    counters = _sum_counters(num_tiles_n, hidden.device) if fused_sum else topk_ids
    _moe_down_kernel[(num_pid_m * num_tiles_n,)](
        a, a_scale, w2, w2s, y, sorted_ids, expert_ids, num_post_pad, topk_weights, out, counters,
        num_pairs, inter, h, num_pid_m,
        a.stride(0), a_scale.stride(0), w2.stride(0), w2.stride(1), w2s.stride(0), w2s.stride(1), y.stride(0),
        USE_FP8=fp8, ACT_FP8=act_fp8, EVEN_K=inter % down["BLOCK_K"] == 0, DIRECT=direct, BLOCK_M=bm,
        BLOCK_N=down["BLOCK_N"],
        BLOCK_K=down["BLOCK_K"], GROUP_M=down["GROUP_M"], num_warps=down["num_warps"],
        num_stages=down["num_stages"], FUSED_SUM=fused_sum, TOP_K=top_k if fused_sum else 1,
        TOP_K_PAD=triton.next_power_of_2(top_k) if fused_sum else 1, PDL=pdl,
        **w8_mma_meta(down, fp8, act_fp8, hidden.device), **launch_kwargs(pdl),
    )
    if not fused_sum:
        slots = TopKSlots(y, topk_ids)
        if defer_sum:  # the consumer sums (kernels/norm.py: with the residual add and the next norm)
            return slots
        moe_sum(slots, out, pdl)
    return out


def fused_experts(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * inter, hidden]  (gate rows then up rows)
    w2: torch.Tensor,  # [num_experts, hidden, inter]
    topk_weights: torch.Tensor,  # [num_tokens, top_k] fp32
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int, -1 = slot not handled here
    *,
    w13_scale: torch.Tensor | None = None,  # FP8: [E, ceil(2I/128), ceil(H/128)] fp32
    w2_scale: torch.Tensor | None = None,  # FP8: [E, ceil(H/128), ceil(I/128)] fp32
    config: dict | None = None,
    defer_sum: bool = False,
) -> torch.Tensor | TopKSlots:
    # defer_sum: where this path writes per-slot outputs and would launch the top-k sum, return them un-summed
    # (TopKSlots) instead; else (the TMA path, fused_sum, down_topk, no tokens) the summed tensor as always
    fp8 = _check_moe(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    num_tokens, h = hidden.shape
    num_experts, _, inter = w2.shape
    top_k = topk_ids.shape[1]
    if num_tokens == 0:
        return torch.empty_like(hidden)
    if config is None:
        config = get_moe_config(num_tokens, num_experts, h, inter, top_k, moe_dtype_name(hidden, fp8),
                                hidden.device)
    path = experts_path(config, num_tokens, top_k, tma_supported(hidden, w13, w2))
    if path == "tma":
        return fused_experts_tma(hidden, w13, w2, topk_weights, topk_ids, config["tma"], w13_scale=w13_scale,
                                 w2_scale=w2_scale)
    if path == "gemv":
        return gemv_experts(hidden, w13, w2, topk_weights, topk_ids, config["gemv"], w13_scale, w2_scale, defer_sum)
    if fp8 and any(FP8_BLOCK % config[g]["BLOCK_K"] for g in ("up", "down")):
        raise ValueError("FP8 experts need BLOCK_K dividing 128 (one scale per K step)")
    if num_tokens == 1:  # a token's top-k experts are distinct: no sorting needed, and no align launch
        sorted_ids = expert_ids = num_post_pad = None
    else:
        sorted_ids, expert_ids, num_post_pad = moe_align(topk_ids, num_experts, config["BLOCK_M"])
    return fused_experts_aligned(hidden, w13, w2, topk_weights, topk_ids, sorted_ids, expert_ids, num_post_pad,
                                 config, w13_scale, w2_scale, defer_sum)
