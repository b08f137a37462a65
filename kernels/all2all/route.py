"""The sparse all2all's routing layouts (runtime/distributed/all2all_sparse.py); the data movement that follows is
kernels/all2all/pack.py.

route (the static, CUDA-graph layout): each token's destination ranks and local ids, and the slot of each
  (token, rank) pair in a block of C slots per destination (token order; C = T by default, a smaller capacity
  leaves the pairs past C without a slot), with the inverse map and the full counts (which may exceed C).
route_exact (the dynamic, exact-rows layout): as route, in two passes over the tokens (the counts, then each pair's
  send row in round order), with the count matrix that the all2all's count exchange all-reduces: the host reads
  that matrix once and sizes everything from it; nothing else of the layout goes to the host.
Each has a Triton kernel, a checked wrapper and a torch reference with the same signature.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def sparse_route_ref(
    topk_ids: torch.Tensor,  # [T, k] int global expert ids, -1 = padding
    num_local_experts: int,  # experts per rank, placed in contiguous slices
    num_ranks: int,
    capacity: int | None = None,  # C slots per destination; None = T (nothing can overflow)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The static layout (a block of C slots per destination, in token order): (dest [T, k], local [T, k],
    slot_of [T, P] with P * C = no slot, pair_of [P * C] with T * P = empty row, counts [P] of every pair
    wanted, also those past C), all int64."""
    num_tokens = topk_ids.shape[0]
    cap = num_tokens if capacity is None else capacity
    ids = topk_ids.long()
    dest = torch.where(ids >= 0, ids // num_local_experts, -1)
    local = torch.where(ids >= 0, ids % num_local_experts, -1)
    hit = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=ids.device)
    hit.scatter_(1, dest.masked_fill(dest < 0, num_ranks), True)
    hit = hit[:, :num_ranks]
    num_rows = num_ranks * cap
    pos = hit.long().cumsum(0) - 1  # [T, P] place of each pair among the tokens going to that rank
    base = torch.arange(num_ranks, device=ids.device) * cap
    slot_of = torch.where(hit & (pos < cap), base + pos, num_rows)
    pair_of = torch.full((num_rows + 1,), num_tokens * num_ranks, dtype=torch.int64, device=ids.device)
    pair_of.scatter_(0, slot_of.reshape(-1), torch.arange(num_tokens * num_ranks, device=ids.device))
    return dest, local, slot_of, pair_of[:num_rows], hit.sum(0)


@triton.jit
def _block_hits(ids_ptr, dest_ptr, local_ptr, tt, tmask, rr, n_loc, K: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_P: tl.constexpr, STORE: tl.constexpr):
    # [BLOCK_T, BLOCK_P] int32: 1 where token tt has a pair on rank rr. STORE: also each pair's destination rank and
    # local expert id (-1 on padding ids)
    hit = tl.zeros([BLOCK_T, BLOCK_P], dtype=tl.int32)
    for j in tl.static_range(K):
        e = tl.load(ids_ptr + tt * K + j, mask=tmask, other=-1).to(tl.int64)
        d = tl.where(e >= 0, e // n_loc, -1)
        if STORE:
            tl.store(dest_ptr + tt * K + j, d, mask=tmask)
            tl.store(local_ptr + tt * K + j, tl.where(e >= 0, e % n_loc, -1), mask=tmask)
        hit = tl.maximum(hit, (d[:, None] == rr[None, :]).to(tl.int32))
    return hit


@triton.jit(do_not_specialize=["T", "C"])  # per-step sizes: one compile for all (none while serving)
def _route_kernel(ids_ptr, dest_ptr, local_ptr, slot_ptr, pair_ptr, count_ptr, T, C, n_loc,
                  P: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    # one program: slots are token order within each destination, so a running count carries across blocks
    rr = tl.arange(0, BLOCK_P)
    pmask = rr < P
    running = tl.zeros([BLOCK_P], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        tt = t0 + tl.arange(0, BLOCK_T)
        tmask = tt < T
        hit = _block_hits(ids_ptr, dest_ptr, local_ptr, tt, tmask, rr, n_loc, K, BLOCK_T, BLOCK_P, True)
        pos = tl.cumsum(hit, axis=0) - 1 + running[None, :]
        kept = (hit > 0) & (pos < C)  # pairs past the capacity get no slot (the caller counts the overflow)
        slot = tl.where(kept, rr[None, :].to(tl.int64) * C + pos, P * C)
        both = tmask[:, None] & pmask[None, :]
        tl.store(slot_ptr + tt[:, None] * P + rr[None, :], slot, mask=both)
        tl.store(pair_ptr + slot, tt[:, None].to(tl.int64) * P + rr[None, :], mask=both & kept)
        running += tl.sum(hit, axis=0)
    tl.store(count_ptr + rr, running.to(tl.int64), mask=pmask)


def sparse_route(topk_ids: torch.Tensor, num_local_experts: int, num_ranks: int, capacity: int | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64) or num_local_experts <= 0:
        raise ValueError(f"sparse_route: topk_ids [T, k] int32/int64, got {tuple(topk_ids.shape)} {topk_ids.dtype}")
    num_tokens, top_k = topk_ids.shape
    cap = num_tokens if capacity is None else capacity
    if not 0 <= cap <= max(num_tokens, 1):
        raise ValueError(f"sparse_route: capacity {capacity} must be in [0, T={num_tokens}]")
    device = topk_ids.device
    dest = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
    local = torch.empty_like(dest)
    slot_of = torch.empty(num_tokens, num_ranks, dtype=torch.int64, device=device)
    pair_of = torch.full((num_ranks * cap,), num_tokens * num_ranks, dtype=torch.int64, device=device)
    counts = torch.empty(num_ranks, dtype=torch.int64, device=device)
    _route_kernel[(1,)](topk_ids.contiguous(), dest, local, slot_of, pair_of, counts, num_tokens, cap,
                        num_local_experts,
                        P=num_ranks, K=top_k, BLOCK_T=64, BLOCK_P=triton.next_power_of_2(num_ranks), num_warps=4)
    return dest, local, slot_of, pair_of, counts


def sparse_route_exact_ref(
    topk_ids: torch.Tensor,  # [T, k] int global expert ids, -1 = padding
    num_local_experts: int,
    num_ranks: int,
    round_rows: int,  # R: rows per destination per collective round
    rank: int,  # this rank: its counts go to row `rank` of the count matrix
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact-rows (dynamic) layout, sized on the device before anything is read on the host: the send rows are
    in round order, round j holding rows [j R, (j + 1) R) of each destination's pairs (token order) in destination
    order, so every round is one contiguous run of the send buffer. Returns (dest [T, k], local [T, k],
    slot_of [T, P] send row of each (token, rank) pair with N = sum(counts) = no row, pair_of [T * P] the inverse,
    first N entries (the rest unspecified), count matrix [P, P] zero but row `rank` = counts), all int64."""
    num_tokens, device = topk_ids.shape[0], topk_ids.device
    ids = topk_ids.long()
    dest = torch.where(ids >= 0, ids // num_local_experts, -1)
    local = torch.where(ids >= 0, ids % num_local_experts, -1)
    hit = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=device)
    hit.scatter_(1, dest.masked_fill(dest < 0, num_ranks), True)
    hit = hit[:, :num_ranks]
    pos = hit.long().cumsum(0) - 1  # [T, P] place of each pair among the tokens going to that rank
    counts = hit.sum(0)  # [P]
    if round_rows >= num_tokens:  # one round (a pair carries at most T rows): destination after destination
        row = counts.cumsum(0) - counts + pos
    else:
        lo = (pos.clamp(min=0) // round_rows * round_rows).unsqueeze(2)  # [T, P, 1] first row of the pair's round
        before_round = torch.minimum(counts, lo).sum(2)  # rows of the earlier rounds, every destination
        in_round = (counts - lo).clamp(0, round_rows)  # [T, P, P'] rows of destination r' in the pair's round
        earlier = torch.arange(num_ranks, device=device) < torch.arange(num_ranks, device=device).unsqueeze(1)
        row = before_round + (in_round * earlier).sum(2) + pos - lo.squeeze(2)
    num_rows = counts.sum()
    slot_of = torch.where(hit, row, num_rows)
    pair_of = torch.zeros(num_tokens * num_ranks + 1, dtype=torch.int64, device=device)
    pair_of.scatter_(0, slot_of.reshape(-1), torch.arange(num_tokens * num_ranks, device=device))
    matrix = torch.zeros(num_ranks, num_ranks, dtype=torch.int64, device=device)
    matrix[rank] = counts
    return dest, local, slot_of, pair_of[: num_tokens * num_ranks], matrix


@triton.jit(do_not_specialize=["T"])  # one compile for every prefill size
def _route_exact_kernel(ids_ptr, dest_ptr, local_ptr, slot_ptr, pair_ptr, matrix_ptr, T, R, n_loc, rank,
                        P: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    # one program, two passes over the tokens: the counts, then (knowing them) each pair's send row
    rr = tl.arange(0, BLOCK_P)
    pmask = rr < P
    counts = tl.zeros([BLOCK_P], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        tt = t0 + tl.arange(0, BLOCK_T)
        tmask = tt < T
        hit = _block_hits(ids_ptr, dest_ptr, local_ptr, tt, tmask, rr, n_loc, K, BLOCK_T, BLOCK_P, True)
        counts += tl.sum(hit, axis=0)
    for q in range(0, P):  # the all_reduce's input: this rank's row, zeros elsewhere
        tl.store(matrix_ptr + q * P + rr, tl.where(q == rank, counts, 0).to(tl.int64), mask=pmask)
    num_rows = tl.sum(counts, axis=0).to(tl.int64)
    num_rounds = tl.maximum((tl.max(counts, axis=0) + R - 1) // R, 1)  # a pass marks the pairs without a row
    for j in range(0, num_rounds):
        lo = j * R
        in_round = tl.minimum(tl.maximum(counts - lo, 0), R)  # [P] rows of each destination in round j
        base = (tl.sum(tl.minimum(counts, lo), axis=0) + tl.cumsum(in_round, axis=0) - in_round - lo).to(tl.int64)
        running = tl.zeros([BLOCK_P], dtype=tl.int32)
        for t0 in range(0, T, BLOCK_T):
            tt = t0 + tl.arange(0, BLOCK_T)
            tmask = tt < T
            # from the ids again: other threads stored dest, unfenced
            hit = _block_hits(ids_ptr, dest_ptr, local_ptr, tt, tmask, rr, n_loc, K, BLOCK_T, BLOCK_P, False)
            pos = tl.cumsum(hit, axis=0) - 1 + running[None, :]
            mine = (hit > 0) & (pos >= lo) & (pos < lo + R)  # the pairs of round j
            both = tmask[:, None] & pmask[None, :]
            slot = base[None, :] + pos
            # round 0 also marks the pairs that go nowhere (slot N)
            tl.store(slot_ptr + tt[:, None] * P + rr[None, :], tl.where(mine, slot, num_rows),
                     mask=both & (mine | ((hit == 0) & (j == 0))))
            tl.store(pair_ptr + slot, tt[:, None].to(tl.int64) * P + rr[None, :], mask=both & mine)
            running += tl.sum(hit, axis=0)


def sparse_route_exact(topk_ids: torch.Tensor, num_local_experts: int, num_ranks: int, round_rows: int, rank: int,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64) or num_local_experts <= 0:
        raise ValueError(f"sparse_route_exact: topk_ids [T, k] int32/int64, got {tuple(topk_ids.shape)} "
                         f"{topk_ids.dtype}")
    if round_rows <= 0 or not 0 <= rank < num_ranks:
        raise ValueError(f"sparse_route_exact: round_rows {round_rows} must be > 0, rank {rank} in [0, {num_ranks})")
    num_tokens, top_k = topk_ids.shape
    device = topk_ids.device
    dest = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
    local = torch.empty_like(dest)
    slot_of = torch.empty(num_tokens, num_ranks, dtype=torch.int64, device=device)
    pair_of = torch.empty(num_tokens * num_ranks, dtype=torch.int64, device=device)
    matrix = torch.empty(num_ranks, num_ranks, dtype=torch.int64, device=device)
    # one program walks the tokens (twice): tiles of up to [512, P] pairs keep the walk to a few steps at a
    # prefill's sizes (2048 tokens over 8 ranks: 4 per pass); 8 warps hold a 4096-pair tile without spilling
    # (sm_90 compile: 226 registers at P = 8, 255 at P = 64; 4 warps spilled at P >= 8)
    block_p = triton.next_power_of_2(num_ranks)
    _route_exact_kernel[(1,)](topk_ids.contiguous(), dest, local, slot_of, pair_of, matrix, num_tokens, round_rows,
                              num_local_experts, rank, P=num_ranks, K=top_k, BLOCK_T=max(16, min(512, 4096 // block_p)),
                              BLOCK_P=block_p, num_warps=8)
    return dest, local, slot_of, pair_of, matrix
