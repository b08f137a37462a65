"""The large-M MoE path: tokens permuted expert-contiguous, then persistent grouped GEMMs over TMA descriptors.

fused_experts_tma runs: moe_align -> permute_tokens (kernels/moe_permute.py: a_perm, each expert's rows
padded to BLOCK_M) -> gate_up grouped GEMM with SiLU-and-mul in its epilogue -> down grouped GEMM -> the
weighted top-k sum through the inverse permutation. Both GEMMs read dense [BLOCK_M, BLOCK_K] activation tiles
and [BLOCK_N, BLOCK_K] weight tiles with TMA (host TensorDescriptors; the interpreter runs the same code),
and write their output tiles with TMA. One program per SM loops over the (row block, column tile) pairs; the
tile count comes from align's num_post_pad on the device, so the launch never syncs to the host.
fused_moe.fused_experts takes this path when the config has a "tma" entry and the rows reach its min_rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.fp8 import FP8_BLOCK, per_token_group_quant
from kernels.moe_align import moe_align
from kernels.moe_permute import permute_tokens, unpermute_sum
from kernels.tiles import grouped_tile

TMA_GEMM_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "warp_specialize", "store_tma",
                 "flatten")


def default_tma_config(min_rows: int = 0, float32: bool = False, fp8: bool = False) -> dict:
    """A sane TMA config (not a tuned one: fused_experts takes this path only from a tuned table)."""
    g = {"BLOCK_N": 128, "BLOCK_K": 128 if fp8 else 32 if float32 else 64, "GROUP_M": 8, "num_warps": 8,
         "num_stages": 2 if float32 else 3, "warp_specialize": False}
    # FP8's per-step partial product sits beside the gate_up kernel's two accumulators: a narrower tile
    return {"min_rows": min_rows, "BLOCK_M": 128, "up": dict(g, BLOCK_N=64 if fp8 else 128), "down": dict(g)}


@triton.jit
def _grouped_gemm_kernel(
    a_desc, w_desc, out_desc, out_ptr, a_scale_ptr, w_scale_ptr, expert_ids_ptr, num_post_pad_ptr,
    K, N, W_ROWS, stride_o, stride_as, stride_wse, stride_wsn,
    SILU_MUL: tl.constexpr, STORE_TMA: tl.constexpr, USE_FP8: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr,
):
    # a [rows, K] permuted activations; w the experts' weights stacked [E * W_ROWS, K] (w13: W_ROWS = 2N, the
    # gate rows e * 2N + n and the up rows e * 2N + N + n; w2: W_ROWS = N); out [rows, N].
    # out[p, n] = a[p] . w[e, n]  or, SILU_MUL, silu(a[p] . w[e, n]) * (a[p] . w[e, N + n]), e = the block's
    # expert. A weight tile past row n = N reads the next rows (or TMA's zeros): only columns >= N see them,
    # and the output descriptor clips those; K tails are TMA's zeros on both operands.
    # USE_FP8 (BLOCK_K = 128, one scale step per K step): e4m3 a and w, a_scale [rows, K / 128] per row and
    # group, w_scale [E, W_ROWS / 128, K / 128] per 128 x 128 weight block (HF weight_scale_inv).
    num_pid_m = tl.load(num_post_pad_ptr) // BLOCK_M  # the blocks align used, all of them with an expert
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # FLATTEN (without warp specialization): one pipelined loop over (tile, k step), so the next tile's first
    # loads overlap this tile's last MMAs and its epilogue
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        e = tl.load(expert_ids_ptr + pid_m)
        off_m = pid_m * BLOCK_M
        row = e * W_ROWS + pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if USE_FP8:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = offs_n < N
            as_ptrs = a_scale_ptr + (off_m + tl.arange(0, BLOCK_M)).to(tl.int64) * stride_as  # [BLOCK_M]
            ws_ptrs = w_scale_ptr + e.to(tl.int64) * stride_wse + (offs_n // 128) * stride_wsn  # [BLOCK_N]
            wsu_ptrs = w_scale_ptr + e.to(tl.int64) * stride_wse + ((offs_n + N) // 128) * stride_wsn
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = a_desc.load([off_m, off_k])
            if USE_FP8:
                a_s = tl.load(as_ptrs + ki)[:, None]
                w_s = tl.load(ws_ptrs + ki, mask=nmask, other=0.0)[None, :]
                acc += tl.dot(a, w_desc.load([row, off_k]).T) * a_s * w_s
                if SILU_MUL:
                    wu_s = tl.load(wsu_ptrs + ki, mask=nmask, other=0.0)[None, :]
                    acc_up += tl.dot(a, w_desc.load([row + N, off_k]).T) * a_s * wu_s
            else:
                acc = tl.dot(a, w_desc.load([row, off_k]).T, acc)
                if SILU_MUL:
                    acc_up = tl.dot(a, w_desc.load([row + N, off_k]).T, acc_up)
        if SILU_MUL:
            acc = acc * tl.sigmoid(acc) * acc_up
        if STORE_TMA:
            out_desc.store([off_m, pid_n * BLOCK_N], acc.to(out_desc.dtype))
        else:  # pointer stores: Hopper's warp specialization splits a 128-row tile, a TMA store cannot take the parts
            offs_m = off_m + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_o + offs_n[None, :]
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=offs_n[None, :] < N)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 3  # the interpreter: few programs, so each loops over several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


def grouped_gemm(
    a: torch.Tensor,  # [rows, K], rows a multiple of block_m, expert-contiguous blocks
    w: torch.Tensor,  # [E * w_rows, K]
    out: torch.Tensor,  # [rows, N]
    expert_ids: torch.Tensor,  # [rows // block_m] int32, from moe_align
    num_post_pad: torch.Tensor,  # [1] int32
    n: int, w_rows: int, silu_mul: bool, block_m: int, g: dict, num_sms: int | None = None,
    a_scale: torch.Tensor | None = None,  # FP8: [rows, ceil(K / 128)] fp32
    w_scale: torch.Tensor | None = None,  # FP8: [E, ceil(w_rows / 128), ceil(K / 128)] fp32
) -> None:
    rows, k = a.shape
    bn, bk = g["BLOCK_N"], g["BLOCK_K"]
    fp8 = w_scale is not None
    if fp8 and (bk != FP8_BLOCK or a_scale is None):
        raise ValueError(f"the FP8 grouped GEMM needs BLOCK_K = {FP8_BLOCK} and activation scales, got {bk}")
    a_s, w_s = (a_scale, w_scale) if fp8 else (expert_ids, expert_ids[:1].view(1, 1))  # (unused without FP8)
    a_desc = TensorDescriptor.from_tensor(a, [block_m, bk])
    w_desc = TensorDescriptor.from_tensor(w, [bn, bk])
    out_desc = TensorDescriptor.from_tensor(out, [block_m, bn])
    num_sms = num_sms or _num_sms(a.device)
    ws = bool(g.get("warp_specialize", False))
    if ws and a.device.type == "cuda":
        # Triton 3.6 on an H200 (sessions 16-18, each tile alone): three of four warp-specialized tiles never
        # finished (60 s each), the fourth, (64, 128, 64, 4 warps, 4 stages), returned NaN; no table holds one, and
        # no other GPU or Triton version has run one: refused on every GPU until one passes there
        raise ValueError("warp_specialize: the warp-specialized grouped GEMM hung or returned NaN on an H200 with "
                         "Triton 3.6 and is refused on GPUs: set it false in this MoE config")
    # Hopper's warp specialization splits the tile between two consumer warp groups: a TMA store of the whole
    # tile then fails to compile, so it stores through pointers (config "store_tma" overrides)
    store_tma = bool(g.get("store_tma", not ws))
    flatten = bool(g.get("flatten", not ws))
    max_tiles = rows // block_m * triton.cdiv(n, bn)
    _grouped_gemm_kernel[(max(1, min(num_sms, max_tiles)),)](
        a_desc, w_desc, out_desc, out, a_s, w_s, expert_ids, num_post_pad, k, n, w_rows, out.stride(0),
        a_s.stride(0), w_s.stride(0), w_s.stride(1),
        SILU_MUL=silu_mul, STORE_TMA=store_tma, USE_FP8=fp8, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=g["GROUP_M"], NUM_SMS=num_sms, WARP_SPECIALIZE=ws, FLATTEN=flatten,
        num_warps=g["num_warps"], num_stages=g["num_stages"],
    )


def tma_supported(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides (H and I times the weights' element size)."""
    elem = min(hidden.element_size(), w2.element_size())
    return (hidden.shape[1] * elem % 16 == 0 and w2.shape[2] * elem % 16 == 0
            and w13.data_ptr() % 16 == 0 and w2.data_ptr() % 16 == 0)


def fused_experts_tma(
    hidden: torch.Tensor,  # [num_tokens, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [num_tokens, top_k] fp32
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int, -1 = slot not handled here
    cfg: dict,  # a config's "tma" entry: BLOCK_M, up / down {TMA_GEMM_KEYS}; "gluon": 1 takes kernels/moe_gluon.py
    # (FP8: kernels/moe_gluon_fp8.py)
    num_sms: int | None = None,
    w13_scale: torch.Tensor | None = None,  # FP8: [E, ceil(2I/128), ceil(H/128)] fp32
    w2_scale: torch.Tensor | None = None,  # FP8: [E, ceil(H/128), ceil(I/128)] fp32
) -> torch.Tensor:
    """fused_experts' answer on the permuted path (inputs checked by fused_experts). FP8: activations quantized
    per token and 128 channels (before the permute, and again between the GEMMs), FP8 MMA."""
    num_tokens, h = hidden.shape
    num_experts, _, inter = w2.shape
    top_k = topk_ids.shape[1]
    bm = cfg["BLOCK_M"]
    fp8 = w13_scale is not None
    sorted_ids, expert_ids, num_post_pad = moe_align(topk_ids, num_experts, bm)
    x, x_scale = per_token_group_quant(hidden) if fp8 else (hidden, None)
    a_perm, inv, a_scale = permute_tokens(x, sorted_ids, num_post_pad, top_k, x_scale)  # [rows, H]
    rows = a_perm.shape[0]
    act = torch.empty(rows, inter, dtype=hidden.dtype, device=hidden.device)
    if cfg.get("gluon") and fp8:  # the FP8 block-scaled Gluon kernel (kernels/moe_gluon_fp8.py), same flow
        from kernels.moe_gluon_fp8 import moe_gemms_gluon_fp8
        y = moe_gemms_gluon_fp8(a_perm, a_scale, act, w13, w13_scale, w2, w2_scale, expert_ids, num_post_pad, cfg,
                                num_sms)
        return unpermute_sum(y, inv, topk_weights, topk_ids)
    if cfg.get("gluon"):  # the warp-specialized Gluon kernel (kernels/moe_gluon.py), bf16/fp16, from a tuned table
        from kernels.moe_gluon import moe_gemms_gluon
        y = moe_gemms_gluon(a_perm, act, w13, w2, expert_ids, num_post_pad, cfg, num_sms, fp8)
        return unpermute_sum(y, inv, topk_weights, topk_ids)
    grouped_gemm(a_perm, w13.view(num_experts * 2 * inter, h), act, expert_ids, num_post_pad, inter, 2 * inter,
                 True, bm, cfg["up"], num_sms, a_scale, w13_scale)
    # (FP8: rows past num_post_pad are quantized too, unused: the buffer's size is fixed by shapes)
    act, act_scale = per_token_group_quant(act) if fp8 else (act, None)
    y = torch.empty(rows, h, dtype=hidden.dtype, device=hidden.device)  # unweighted per-row outputs
    grouped_gemm(act, w2.view(num_experts * h, inter), y, expert_ids, num_post_pad, h, h, False, bm, cfg["down"],
                 num_sms, act_scale, w2_scale)
    return unpermute_sum(y, inv, topk_weights, topk_ids)
