"""The sparse all2all's data movement (runtime/distributed/all2all_sparse.py) after the routing layout
(kernels/all2all/route.py): pack the send rows, unpack them, combine replies, count the exchanged pairs.

pack: send row i carries the (token, rank) pair pair_of[i] = t * P + r (T * P: an empty row): the
  token's routing weights (0 where the slot's expert is not on rank r), r's local expert ids (-1 there), its
  hidden row (model dtype, or FP8: quantized per token and 128-channel group in the same pass, as
  kernels/fp8.py per_token_group_quant does, or given as bytes), for FP8 its group scales, and optionally one
  int32 flag word (the
  same device scalar in every row: the sender's capacity-overflow flag). The outputs are strided views of
  one uint8 row buffer, so one kernel fills a row's fields in one pass.
unpack: the received rows -> contiguous weights, local ids and hidden rows (FP8 dequantized) for the experts.
combine: out[t] = sum over ranks r of back[slot_of[t, r]] in fp32, in rank order; slot N means no reply.
exchange_pairs: a static exchange's (token, rank) pairs sent to and received from the other ranks, added into the
  expert statistics' counters in one launch (runtime/distributed/expert_stats.py).
Each has a Triton kernel, a checked wrapper and a torch reference with the same signature.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8 import _MIN_SCALE, FP8_BLOCK, FP8_DTYPE, FP8_MAX, per_token_group_quant_ref


def sparse_pack_ref(
    hidden: torch.Tensor,  # [T, H'] model dtype, or FP8 bytes viewed as uint8
    scales: torch.Tensor | None,  # [T, G] fp32 FP8 group scales of FP8 bytes; None: none, or quantize (below)
    topk_weights: torch.Tensor,  # [T, k] fp32
    dest: torch.Tensor,  # [T, k] int64 destination rank of each slot, -1 = padding
    local: torch.Tensor,  # [T, k] int64 local expert id on that rank
    pair_of: torch.Tensor,  # [N] int64
    num_ranks: int,
    out_weights: torch.Tensor,  # [N, k] fp32 view
    out_ids: torch.Tensor,  # [N, k] int32 view
    out_hidden: torch.Tensor,  # [N, H'] view, hidden's dtype; FP8 e4m3 with scales None: quantize hidden here
    out_scales: torch.Tensor | None,  # [N, G] fp32 view, or None
    flag: torch.Tensor | None = None,  # [1] int32 on the device: written into every row's flag word
    out_flags: torch.Tensor | None = None,  # [N] int32 view (one word per row), or None
) -> None:
    if scales is None and out_scales is not None:  # quantize: per token and 128-channel group
        hidden, scales = per_token_group_quant_ref(hidden, FP8_BLOCK)
    num_tokens = hidden.shape[0]
    token = (pair_of // num_ranks).clamp(max=num_tokens - 1)  # an empty row's hidden is never read
    on = (dest[token] == (pair_of % num_ranks).unsqueeze(1)) & (pair_of < num_tokens * num_ranks).unsqueeze(1)
    out_weights.copy_(torch.where(on, topk_weights[token], 0.0))
    out_ids.copy_(torch.where(on, local[token], -1))
    out_hidden.copy_(hidden[token])
    if scales is not None and out_scales is not None:
        out_scales.copy_(scales[token])
    if flag is not None and out_flags is not None:
        out_flags.copy_(flag.expand_as(out_flags))


@triton.jit(do_not_specialize=["num_tokens"])  # per-step sizes: one compile for all (none while serving)
def _pack_kernel(pair_ptr, dest_ptr, local_ptr, w_ptr, x_ptr, xs_ptr, ow_ptr, oid_ptr, ox_ptr, os_ptr, flag_ptr,
                 of_ptr, num_tokens, H, G, stride_x, stride_xs, stride_ow, stride_oid, stride_ox, stride_os,
                 stride_of, P: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_G: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_FLAG: tl.constexpr, QUANT: tl.constexpr = False,
                 GROUP: tl.constexpr = 128, FP8_MAX_C: tl.constexpr = 448.0, MIN_SCALE: tl.constexpr = 1e-12):
    row = tl.program_id(0).to(tl.int64)
    pair = tl.load(pair_ptr + row)
    valid = pair < num_tokens * P
    t = tl.minimum(pair // P, num_tokens - 1)
    r = pair % P
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < K
    d = tl.load(dest_ptr + t * K + kk, mask=kmask, other=-1)
    on = (d == r) & valid
    w = tl.load(w_ptr + t * K + kk, mask=kmask, other=0.0)
    lid = tl.load(local_ptr + t * K + kk, mask=kmask, other=-1)
    tl.store(ow_ptr + row * stride_ow + kk, tl.where(on, w, 0.0), mask=kmask)
    tl.store(oid_ptr + row * stride_oid + kk, tl.where(on, lid, -1).to(tl.int32), mask=kmask)
    if QUANT:  # per 128-channel group: the arithmetic of kernels/fp8.py _group_quant_kernel, element for element
        # BLOCK_G groups at a time, a [BLOCK_G, GROUP] tile with one max per tile row: a loop over single groups
        # waited on memory and on a cross-warp reduction once per group (16 in turn at H = 2048)
        gg = tl.arange(0, BLOCK_G)
        for h0 in range(0, H, BLOCK_G * GROUP):
            grp = h0 // GROUP + gg  # [BLOCK_G] group ids
            hh = grp[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
            hmask = hh < H
            x = tl.load(x_ptr + t * stride_x + hh, mask=hmask, other=0.0).to(tl.float32)
            scale = tl.maximum(tl.max(tl.abs(x), 1) / FP8_MAX_C, MIN_SCALE)  # [BLOCK_G]
            q = tl.clamp(x / scale[:, None], -FP8_MAX_C, FP8_MAX_C)
            tl.store(ox_ptr + row * stride_ox + hh, q.to(ox_ptr.dtype.element_ty), mask=hmask)
            tl.store(os_ptr + row * stride_os + grp, scale, mask=grp * GROUP < H)
    else:
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            hmask = hh < H
            tl.store(ox_ptr + row * stride_ox + hh, tl.load(x_ptr + t * stride_x + hh, mask=hmask), mask=hmask)
    if HAS_SCALES:
        gg = tl.arange(0, BLOCK_G)
        gmask = gg < G
        tl.store(os_ptr + row * stride_os + gg, tl.load(xs_ptr + t * stride_xs + gg, mask=gmask), mask=gmask)
    if HAS_FLAG:
        tl.store(of_ptr + row * stride_of, tl.load(flag_ptr))


def sparse_pack(hidden: torch.Tensor, scales: torch.Tensor | None, topk_weights: torch.Tensor, dest: torch.Tensor,
                local: torch.Tensor, pair_of: torch.Tensor, num_ranks: int, out_weights: torch.Tensor,
                out_ids: torch.Tensor, out_hidden: torch.Tensor, out_scales: torch.Tensor | None,
                flag: torch.Tensor | None = None, out_flags: torch.Tensor | None = None) -> None:
    num_tokens, h = hidden.shape
    top_k = dest.shape[1]
    n = pair_of.shape[0]
    quant = scales is None and out_scales is not None  # FP8 rows quantized here from model-dtype hidden rows
    if (topk_weights.dtype != torch.float32 or dest.dtype != torch.int64 or local.dtype != torch.int64
            or pair_of.dtype != torch.int64 or out_ids.dtype != torch.int32 or out_weights.dtype != torch.float32
            or out_hidden.dtype != (FP8_DTYPE if quant else hidden.dtype)):
        raise ValueError("sparse_pack: weights fp32, dest/local/pair_of int64, out_ids int32, out_hidden as hidden "
                         "(FP8 e4m3 when quantizing)")
    if quant and out_scales is not None and (hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16)
                                             or out_scales.shape != (n, triton.cdiv(h, FP8_BLOCK))
                                             or out_scales.dtype != torch.float32):
        raise ValueError(f"sparse_pack: quantizing needs float hidden rows and out_scales [{n}, ceil(H / 128)] fp32")
    if (topk_weights.shape != dest.shape or local.shape != dest.shape or dest.shape[0] != num_tokens
            or out_weights.shape != (n, top_k) or out_ids.shape != (n, top_k) or out_hidden.shape != (n, h)):
        raise ValueError(f"sparse_pack: shapes disagree (hidden {tuple(hidden.shape)}, ids {tuple(dest.shape)}, "
                         f"{n} rows)")
    if (scales is not None and out_scales is None) or (flag is None) != (out_flags is None):
        raise ValueError("sparse_pack: scales need out_scales, flag and out_flags go together")
    if flag is not None and out_flags is not None and (
            flag.dtype != torch.int32 or out_flags.dtype != torch.int32 or out_flags.shape != (n,)):
        raise ValueError(f"sparse_pack: flag [1] int32 and out_flags [{n}] int32")
    for t in (hidden, topk_weights, dest, local, out_weights, out_ids, out_hidden):
        if t.stride(-1) != 1:
            raise ValueError("sparse_pack: rows must be contiguous")
    if n == 0 or num_tokens == 0:
        return
    g = scales.shape[1] if scales is not None else 1
    xs = scales if scales is not None else hidden
    os_ = out_scales if out_scales is not None else out_hidden
    fl, of = (flag, out_flags) if flag is not None and out_flags is not None else (out_ids, out_ids)
    _pack_kernel[(n,)](
        pair_of, dest.contiguous(), local.contiguous(), topk_weights.contiguous(), hidden, xs,
        out_weights, out_ids, out_hidden, os_, fl, of, num_tokens, h, g, hidden.stride(0), xs.stride(0),
        out_weights.stride(0), out_ids.stride(0), out_hidden.stride(0), os_.stride(0), of.stride(0),
        P=num_ranks, K=top_k, BLOCK_K=triton.next_power_of_2(top_k), BLOCK_H=min(1024, triton.next_power_of_2(h)),
        # BLOCK_G: the scales' width, or when quantizing the groups of one step (a [16, 128] tile at most)
        BLOCK_G=min(16, triton.next_power_of_2(triton.cdiv(h, FP8_BLOCK))) if quant else triton.next_power_of_2(g),
        HAS_SCALES=scales is not None, HAS_FLAG=flag is not None, QUANT=quant,
        GROUP=FP8_BLOCK, FP8_MAX_C=FP8_MAX, MIN_SCALE=_MIN_SCALE, num_warps=4,
    )


def sparse_unpack_ref(
    weights: torch.Tensor,  # [M, k] fp32 view of the received rows
    ids: torch.Tensor,  # [M, k] int32 view
    hidden: torch.Tensor,  # [M, H] view: model dtype, or FP8 e4m3 with scales
    scales: torch.Tensor | None,  # [M, ceil(H / group)] fp32 view, or None
    dtype: torch.dtype,
    group: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Received rows -> contiguous (weights [M, k] fp32, local ids [M, k] int32, hidden [M, H] dtype)."""
    if scales is None:
        out = hidden.to(dtype, copy=True)
    else:
        out = (hidden.float() * scales.repeat_interleave(group, dim=1)[:, : hidden.shape[1]]).to(dtype)
    return weights.contiguous(), ids.contiguous(), out


@triton.jit
def _unpack_kernel(w_ptr, id_ptr, x_ptr, s_ptr, ow_ptr, oid_ptr, ox_ptr, H, stride_w, stride_id, stride_x,
                   stride_s, K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
                   HAS_SCALES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < K
    tl.store(ow_ptr + row * K + kk, tl.load(w_ptr + row * stride_w + kk, mask=kmask), mask=kmask)
    tl.store(oid_ptr + row * K + kk, tl.load(id_ptr + row * stride_id + kk, mask=kmask), mask=kmask)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        hmask = hh < H
        x = tl.load(x_ptr + row * stride_x + hh, mask=hmask, other=0.0)
        if HAS_SCALES:
            scale = tl.load(s_ptr + row * stride_s + hh // GROUP, mask=hmask, other=0.0)
            x = x.to(tl.float32) * scale
        tl.store(ox_ptr + row * H + hh, x.to(ox_ptr.dtype.element_ty), mask=hmask)


def sparse_unpack(weights: torch.Tensor, ids: torch.Tensor, hidden: torch.Tensor, scales: torch.Tensor | None,
                  dtype: torch.dtype, group: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_rows, top_k = weights.shape
    h = hidden.shape[1]
    if (weights.dtype != torch.float32 or ids.dtype != torch.int32 or ids.shape != weights.shape
            or hidden.shape[0] != num_rows or (scales is None and hidden.dtype != dtype)):
        raise ValueError(f"sparse_unpack: weights fp32 / ids int32 [M, k], hidden [M, H] ({hidden.dtype} -> {dtype})")
    if any(t.stride(-1) != 1 for t in (weights, ids, hidden)):
        raise ValueError("sparse_unpack: rows must be contiguous")
    out_w = torch.empty(num_rows, top_k, dtype=torch.float32, device=weights.device)
    out_ids = torch.empty(num_rows, top_k, dtype=torch.int32, device=weights.device)
    out_x = torch.empty(num_rows, h, dtype=dtype, device=weights.device)
    if num_rows:
        s = scales if scales is not None else weights
        _unpack_kernel[(num_rows,)](
            weights, ids, hidden, s, out_w, out_ids, out_x, h, weights.stride(0), ids.stride(0), hidden.stride(0),
            s.stride(0), K=top_k, BLOCK_K=triton.next_power_of_2(top_k), BLOCK_H=min(1024, triton.next_power_of_2(h)),
            GROUP=group, HAS_SCALES=scales is not None, num_warps=4)
    return out_w, out_ids, out_x


def sparse_combine_ref(back: torch.Tensor, slot_of: torch.Tensor, num_rows: int) -> torch.Tensor:
    """back [N + 1, H] (row N zero here; the Triton kernel never reads it), slot_of [T, P] int64 (N = no reply) ->
    [T, H] in back's dtype, fp32 sums in rank order."""
    out = back[slot_of[:, 0]].float()
    for r in range(1, slot_of.shape[1]):
        out += back[slot_of[:, r]].float()
    return out.to(back.dtype)


@triton.jit(do_not_specialize=["N"])  # the rows sent, per step: one compile for all (N = 1 would be another)
def _combine_kernel(back_ptr, slot_ptr, out_ptr, H, N, stride_b, stride_o, P: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hh < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for r in tl.static_range(P):
        slot = tl.load(slot_ptr + t * P + r)
        acc += tl.load(back_ptr + slot * stride_b + hh, mask=hmask & (slot < N), other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + hh, acc.to(out_ptr.dtype.element_ty), mask=hmask)


def sparse_combine(back: torch.Tensor, slot_of: torch.Tensor, num_rows: int) -> torch.Tensor:
    if slot_of.dtype != torch.int64 or back.dim() != 2 or back.shape[0] != num_rows + 1 or back.stride(1) != 1:
        raise ValueError(f"sparse_combine: back [N + 1, H] with contiguous rows and int64 slots, got "
                         f"{tuple(back.shape)}, N={num_rows}, {slot_of.dtype}")
    num_tokens, num_ranks = slot_of.shape
    h = back.shape[1]
    out = torch.empty(num_tokens, h, dtype=back.dtype, device=back.device)
    if num_tokens:
        block_h = min(1024, triton.next_power_of_2(h))
        _combine_kernel[(num_tokens, triton.cdiv(h, block_h))](
            back, slot_of.contiguous(), out, h, num_rows, back.stride(0), out.stride(0), P=num_ranks,
            BLOCK_H=block_h, num_warps=4)
    return out


def exchange_pairs_ref(counts: torch.Tensor, recv_ids: torch.Tensor, capacity: int, rank: int,
                       out: torch.Tensor) -> None:
    """A static exchange's traffic, added into out [2] int64: the (token, rank) pairs this rank sent to the other
    ranks (min(counts[r], C) for r != rank: those that found a slot) and those it received from them (the rows of
    the other ranks' blocks of recv_ids [P * C, k] that carry an expert id)."""
    num_ranks = counts.shape[0]
    sent = counts.clamp(max=capacity)
    got = (recv_ids.reshape(num_ranks, capacity, recv_ids.shape[1]) >= 0).any(dim=2).sum(1)  # (C 0: no -1)
    remote = torch.arange(num_ranks, device=counts.device) != rank
    out.add_(torch.stack([sent, got]).mul(remote).sum(1))


@triton.jit(do_not_specialize=["C"])  # C: the static block's slots, per step size (C % 16 == 0 another variant)
def _exchange_pairs_kernel(count_ptr, ids_ptr, out_ptr, C, rank, stride_id, K: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    # program r: the block of rank r (nothing for this rank's own); integer atomics, so the sums are exact
    r = tl.program_id(0)
    if r != rank:
        cols = tl.arange(0, BLOCK_K)
        hits = tl.zeros([BLOCK_R], tl.int32)
        for start in range(0, C, BLOCK_R):
            rows = start + tl.arange(0, BLOCK_R)
            ptrs = ids_ptr + (r * C + rows).to(tl.int64)[:, None] * stride_id + cols[None, :]
            ids = tl.load(ptrs, mask=(rows < C)[:, None] & (cols < K)[None, :], other=-1)
            hits += tl.max((ids >= 0).to(tl.int32), 1)
        sent = tl.minimum(tl.load(count_ptr + r), C)
        tl.atomic_add(out_ptr, sent.to(tl.int64))
        tl.atomic_add(out_ptr + 1, tl.sum(hits, 0).to(tl.int64))


def exchange_pairs(counts: torch.Tensor, recv_ids: torch.Tensor, capacity: int, rank: int,
                   out: torch.Tensor) -> None:
    num_ranks = counts.shape[0]
    if (counts.dim() != 1 or recv_ids.dim() != 2 or recv_ids.shape[0] != num_ranks * capacity
            or recv_ids.stride(1) != 1 or out.shape != (2,) or out.dtype != torch.int64 or not 0 <= rank < num_ranks):
        raise ValueError(f"exchange_pairs: counts [P], recv_ids [P * C, k] with contiguous rows, out [2] int64, got "
                         f"{tuple(counts.shape)}, {tuple(recv_ids.shape)} (C={capacity}), {tuple(out.shape)}")
    if capacity == 0:
        return
    _exchange_pairs_kernel[(num_ranks,)](counts, recv_ids, out, capacity, rank, recv_ids.stride(0),
                                         K=recv_ids.shape[1], BLOCK_R=min(64, triton.next_power_of_2(capacity)),
                                         BLOCK_K=triton.next_power_of_2(recv_ids.shape[1]), num_warps=4)
