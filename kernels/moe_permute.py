"""MoE permute / un-permute: tokens into an expert-contiguous buffer and the weighted top-k sum back.

The two undo each other around the dense grouped GEMMs of kernels/moe_grouped_tma.py:
  permute_tokens: a_perm[p] = hidden[sorted_ids[p] // top_k] for each position p < num_post_pad of moe_align's
      layout (each expert's rows padded to BLOCK_M; padding rows are zeros), and inv[pair] = p, the position
      pair (t * top_k + k) landed at; FP8 activations bring their per-token group scales along the same way;
  unpermute_sum: out[t] = sum over the token's handled slots k (topk_ids >= 0) of w[t, k] * y[inv[t * top_k + k]].
Both are bandwidth-bound gathers with sizes fixed by shapes (no host sync, CUDA-graph safe): programs past
num_post_pad exit at once, and rows past it are left unwritten (no GEMM tile reads them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def permute_tokens_ref(
    hidden: torch.Tensor, sorted_ids: torch.Tensor, num_post_pad: torch.Tensor, top_k: int,
    scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    num_tokens, h = hidden.shape
    num_pairs = num_tokens * top_k
    n = int(num_post_pad.item())
    a_perm = torch.zeros(sorted_ids.numel(), h, dtype=hidden.dtype, device=hidden.device)
    inv = torch.zeros(num_pairs, dtype=torch.int32, device=hidden.device)
    pairs = sorted_ids[:n].long()
    valid = pairs < num_pairs
    pos = torch.arange(n, device=hidden.device)[valid]
    a_perm[pos] = hidden[pairs[valid] // top_k]
    inv[pairs[valid]] = pos.to(torch.int32)
    s_perm = None
    if scales is not None:
        s_perm = torch.zeros(sorted_ids.numel(), scales.shape[1], dtype=scales.dtype, device=scales.device)
        s_perm[pos] = scales[pairs[valid] // top_k]
    return a_perm, inv, s_perm


def unpermute_sum_ref(
    y: torch.Tensor, inv: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    handled = (topk_ids >= 0).reshape(-1)
    # an unhandled slot's inv entry is never written: read row 0 for it and zero it, so no stale row gets through
    rows = y[torch.where(handled, inv.long(), 0)].float() * topk_weights.reshape(-1, 1)  # [pairs, H]
    rows[~handled] = 0.0
    return rows.view(*topk_ids.shape, -1).sum(1).to(y.dtype)


@triton.jit(do_not_specialize=["num_pairs", "top_k"])
def _permute_kernel(
    hidden_ptr, sorted_ptr, num_post_pad_ptr, out_ptr, inv_ptr, scale_ptr, scale_out_ptr, num_pairs, top_k, H,
    NUM_GROUPS, stride_h, stride_o, stride_s, stride_so,
    ROWS: tl.constexpr, BLOCK_H: tl.constexpr, HAS_SCALES: tl.constexpr, BLOCK_G: tl.constexpr,
):
    # rows [ROWS] of out, all H columns in BLOCK_H chunks; padding rows (sorted id == num_pairs) get zeros
    pid = tl.program_id(0)
    num_used = tl.load(num_post_pad_ptr)
    if pid * ROWS >= num_used:
        return
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < num_used
    pair = tl.load(sorted_ptr + rows, mask=rmask, other=num_pairs)
    valid = pair < num_pairs
    tok = (pair // top_k).to(tl.int64)
    tl.store(inv_ptr + pair, rows, mask=valid)
    cols = tl.arange(0, BLOCK_H)
    src = hidden_ptr + tok[:, None] * stride_h + cols[None, :]
    dst = out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :]
    for h0 in range(0, H, BLOCK_H):
        cmask = (cols + h0 < H)[None, :]
        x = tl.load(src + h0, mask=valid[:, None] & cmask, other=0.0)
        tl.store(dst + h0, x, mask=rmask[:, None] & cmask)
    if HAS_SCALES:  # FP8: the rows' group scales [ROWS, NUM_GROUPS] (zeros for padding rows)
        g = tl.arange(0, BLOCK_G)
        gmask = (g < NUM_GROUPS)[None, :]
        s = tl.load(scale_ptr + tok[:, None] * stride_s + g[None, :], mask=valid[:, None] & gmask, other=0.0)
        tl.store(scale_out_ptr + rows[:, None].to(tl.int64) * stride_so + g[None, :], s, mask=rmask[:, None] & gmask)


@triton.jit
def _unpermute_sum_kernel(
    y_ptr, inv_ptr, w_ptr, ids_ptr, out_ptr, H, stride_y, stride_o,
    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # out[t, cols] = sum_k w[t, k] * y[inv[t, k], cols] over handled slots, in fp32
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for k in tl.static_range(TOP_K):
        handled = tl.load(ids_ptr + t * TOP_K + k) >= 0
        if handled:
            p = tl.load(inv_ptr + t * TOP_K + k).to(tl.int64)
            w = tl.load(w_ptr + t * TOP_K + k)
            acc += w * tl.load(y_ptr + p * stride_y + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


def _check_layout(sorted_ids: torch.Tensor, num_post_pad: torch.Tensor) -> None:
    if sorted_ids.dtype != torch.int32 or num_post_pad.dtype != torch.int32 or num_post_pad.numel() != 1:
        raise ValueError("sorted_ids / num_post_pad must be moe_align's int32 outputs")


def permute_tokens(
    hidden: torch.Tensor,  # [num_tokens, H]
    sorted_ids: torch.Tensor,  # [max_blocks * BLOCK_M] int32, from moe_align
    num_post_pad: torch.Tensor,  # [1] int32
    top_k: int,
    scales: torch.Tensor | None = None,  # FP8: [num_tokens, groups] fp32 per-token group scales of hidden
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(a_perm [max_blocks * BLOCK_M, H], inv [num_tokens * top_k] int32, the scales permuted alike or None)."""
    _check_layout(sorted_ids, num_post_pad)
    if hidden.dim() != 2 or hidden.stride(1) != 1:
        raise ValueError(f"hidden must be [tokens, H] with contiguous rows, got {tuple(hidden.shape)}")
    num_tokens, h = hidden.shape
    if scales is not None and (scales.dim() != 2 or scales.shape[0] != num_tokens or scales.stride(1) != 1):
        raise ValueError(f"scales must be [{num_tokens}, groups] with contiguous rows, got {tuple(scales.shape)}")
    a_perm = torch.empty(sorted_ids.numel(), h, dtype=hidden.dtype, device=hidden.device)
    inv = torch.empty(num_tokens * top_k, dtype=torch.int32, device=hidden.device)
    s_perm = None if scales is None else scales.new_empty(sorted_ids.numel(), scales.shape[1])
    if sorted_ids.numel() == 0:
        return a_perm, inv, s_perm
    block_h = min(512, triton.next_power_of_2(h))
    rows = max(1, min(32, 4096 // block_h))  # a [rows, block_h] tile of ~4k elements in flight per step
    sc, sco = (scales, s_perm) if scales is not None else (inv, inv)  # (unused without HAS_SCALES)
    _permute_kernel[(triton.cdiv(sorted_ids.numel(), rows),)](
        hidden, sorted_ids, num_post_pad, a_perm, inv, sc, sco, num_tokens * top_k, top_k, h,
        sc.shape[-1], hidden.stride(0), a_perm.stride(0), sc.stride(0), sco.stride(0),
        ROWS=rows, BLOCK_H=block_h, HAS_SCALES=scales is not None,
        BLOCK_G=triton.next_power_of_2(sc.shape[-1]) if scales is not None else 1, num_warps=4,
    )
    return a_perm, inv, s_perm


def unpermute_sum(
    y: torch.Tensor,  # [max_blocks * BLOCK_M, H], rows in permuted order
    inv: torch.Tensor,  # [num_tokens * top_k] int32, from permute_tokens
    topk_weights: torch.Tensor,  # [num_tokens, top_k] fp32
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int, -1 = slot not handled here
) -> torch.Tensor:
    num_tokens, top_k = topk_ids.shape
    if inv.numel() != num_tokens * top_k or y.stride(1) != 1:
        raise ValueError(f"inv {tuple(inv.shape)} must have {num_tokens * top_k} entries, y contiguous rows")
    h = y.shape[1]
    out = torch.empty(num_tokens, h, dtype=y.dtype, device=y.device)
    if num_tokens == 0:
        return out
    block_h = min(1024, triton.next_power_of_2(h))
    _unpermute_sum_kernel[(num_tokens, triton.cdiv(h, block_h))](
        y, inv, topk_weights, topk_ids, out, h, y.stride(0), out.stride(0), TOP_K=top_k, BLOCK_H=block_h,
    )
    return out
