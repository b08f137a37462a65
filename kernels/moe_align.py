"""MoE align: sort (token, slot) pairs by expert and pad each expert's segment to BLOCK_M, on the GPU.

Outputs have sizes fixed by shapes alone (no host sync, CUDA-graph safe):
  sorted_ids [max_blocks * block_m] int32: flat pair index t * top_k + k, or num_pairs for padding;
  expert_ids [max_blocks] int32: the expert of each BLOCK_M block, -1 past the used blocks;
  num_post_pad [1] int32: how many entries of sorted_ids are in use (a multiple of block_m).
Pairs with expert id -1 (slots handled by another expert-parallel rank) are dropped. Within an expert the
pairs keep their flat order, so the result is deterministic. Up to ONE_PROGRAM_PAIRS pairs one program does it
all (one launch: small decode steps); beyond, a count launch and a scatter launch over one program a chunk of
pairs, no memset; past SCAN_CHUNKS chunks the count kernel's last program (one arrival counter per device, which
it re-arms) sums the chunks' counts once. A program ranks its pairs among its chunk's pairs of the same expert in
one of two ways (rank=): "pairwise" compares (work ~ chunk^2: chunks <= SMALL_PAIRS) or "sort", a bitonic tl.sort
of the keys expert * CHUNK + index (work ~ chunk log^2 chunk: chunks up to SORT_MAX_CHUNK, and one program up to
that many pairs where asked); both give the same bits. The default plan ranks pairwise below SORT_FROM_PAIRS pairs
and sorts from there (ALIGN_RANK "auto", measured). The compiled variants follow the pair count (align_plan);
kernels/moe_plan.py warmup_token_counts reaches each of them at start-up.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import zeroed_counters
from kernels.pdl import launch_kwargs, pdl_enabled, pdl_release, pdl_wait

SMALL_PAIRS = 256  # largest chunk of pairs a program handles at once
# Measured on an H200 (benchmarks/bench_align.py, 128 experts, per call in a chain of calls; RESULTS.md session 10):
# one program's rank work grows with the square of its pairs (64 pairs 3.4 us, 128 5.3, 256 9.1), the two
# launches' with the chunk and each program's prefix over all chunks: 6.0-6.2 us from 256 to 2048 pairs in 64-pair
# chunks, 8.5 us at 8192 pairs in 256-pair chunks (in 64-pair chunks 14.5). So: one program up to 128 pairs, beyond
# it chunks of 64 pairs growing to keep <= ALIGN_CHUNKS programs
ONE_PROGRAM_PAIRS = 128
ALIGN_CHUNKS = 32
# more chunks than this: the count kernel's last program sums the chunks' counts once (SCAN), instead of every
# scatter program reading all of them. H200 (session 10, two serial passes then): 128 chunks 28.4 -> 15.9 us, 256
# chunks 49.0 -> 25.8 us. Its pass is one now; session 18 (bench_align's scan / noscan columns, the default chunk
# rule, 128 / 160 experts): 64 chunks (32768 pairs, sort rank) 11.2 -> 9.9 / 13.2 -> 12.0 us; 32 chunks (every size
# from 2048 to 16384 pairs) lost or tied (2048 pairs 6.4 -> 6.6 / 7.6 -> 7.8, 4096 7.0 -> 7.5 / 8.2 -> 8.6, 8192
# 7.5 -> 7.7 / 9.2 -> 9.0, 16384 8.6 -> 8.4 / 10.0 -> 10.0); 33-63 chunks unmeasured: from 33 chunks
SCAN_CHUNKS = 32
# the rank of the default plan: "auto" is pairwise below SORT_FROM_PAIRS pairs, sort from there in chunks of 256,
# of SORT_CHUNK from 16384 pairs. Measured on an H200 (session 17, bench_align, per call; pairwise default ->
# sort, 128 / 160 experts): 8192 pairs 8.6 -> 7.5 / 11.3 -> 9.2 us (chunks of 512: 8.6 / 8.5), 16384 11.3 -> 8.6 /
# 14.5 -> 10.0, 32768 15.1 -> 11.3 / 24.2 -> 13.2, 65536 23.3 -> 13.7 / 42.6 -> 16.0 (chunks of 1024 tie 512
# there, 2048 lose 2x, 4096 5x); at 512 pairs sort lost (6.2 -> 6.7 us), between 512 and 8192 it is unmeasured
ALIGN_RANK = "auto"
RANKS = ("pairwise", "sort")
SORT_FROM_PAIRS = 8192
SORT_CHUNK = 512
# the sort rank's largest chunk (and one program): no [CHUNK, E_PAD] tile, so no e_pad cap. Compiled for sm90 (8
# warps, 128 and 160 experts) its kernels spill nothing up to 4096 pairs (<= 128 registers, 16 KiB of shared
# memory) and give moe_align_ref's bits on the H200 (session 17), but chunks past 1024 are slow there (a bitonic
# sort of 2048 keys in one program: ~23 us a call); the interpreter sorts 4096 keys in ~5 s
SORT_MAX_CHUNK = 4096


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    # each non-empty expert wastes at most block_m - 1 rows, and at most min(pairs, experts) are non-empty
    return triton.cdiv(num_pairs + min(num_pairs, num_experts) * (block_m - 1), block_m)


def moe_align_ref(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    nblocks = max_blocks(num_pairs, num_experts, block_m)
    sorted_ids = torch.full((nblocks * block_m,), num_pairs, dtype=torch.int32, device=flat.device)
    expert_ids = torch.full((nblocks,), -1, dtype=torch.int32, device=flat.device)
    pos = 0
    for e in range(num_experts):
        pairs = (flat == e).nonzero().flatten()
        if pairs.numel() == 0:
            continue
        sorted_ids[pos : pos + pairs.numel()] = pairs.to(torch.int32)
        padded = triton.cdiv(pairs.numel(), block_m) * block_m
        expert_ids[pos // block_m : (pos + padded) // block_m] = e
        pos += padded
    return sorted_ids, expert_ids, torch.tensor([pos], dtype=torch.int32, device=flat.device)


@triton.jit
def _write_expert_ids(ends, expert_ids_ptr, total, first, last, BLOCK_M: tl.constexpr, BB: tl.constexpr):
    # blocks [first, last): block j belongs to the expert whose padded segment [start, end) holds j * BLOCK_M;
    # ends [E_PAD]
    for b0 in range(first, last, BB):
        j = b0 + tl.arange(0, BB)
        row = j * BLOCK_M
        e = tl.sum((row[:, None] >= ends[None, :]).to(tl.int32), 1)
        tl.store(expert_ids_ptr + j, tl.where(row < total, e, -1), mask=j < last)


@triton.jit
def _rank_in_chunk(ids_ptr, ids, chunk_start, num_pairs, CHUNK: tl.constexpr, SUB: tl.constexpr):
    # rank of each pair among the earlier pairs of its chunk that go to the same expert; ids [CHUNK]
    # (pairwise compares in [CHUNK, SUB] slices: a reduction, far cheaper than a 2-D scan)
    i = tl.arange(0, CHUNK)
    rank = tl.zeros([CHUNK], tl.int32)
    for j0 in tl.static_range(0, CHUNK, SUB):
        j = j0 + tl.arange(0, SUB)
        idj = tl.load(ids_ptr + chunk_start + j, mask=chunk_start + j < num_pairs, other=-1)
        same = (ids[:, None] == idj[None, :]) & (j[None, :] < i[:, None])
        rank += tl.sum(same.to(tl.int32), 1)
    return rank


@triton.jit
def _scatter_sorted(sorted_ptr, ids, valid, first, chunk_start, NUM_EXPERTS: tl.constexpr, CHUNK: tl.constexpr):
    # the sort rank: the chunk's valid pairs sorted by (expert, index) (keys e * CHUNK + i, invalid ones last) lie
    # expert by expert in flat order, so the one at sorted position p goes to first[e] + p, where first [E_PAD] is
    # each expert's slot of this chunk's first pair minus the chunk's valid pairs of the experts before it; ids,
    # valid [CHUNK]
    i = tl.arange(0, CHUNK)
    key = tl.sort(tl.where(valid, ids.to(tl.int32) * CHUNK + i, NUM_EXPERTS * CHUNK))
    ok = key < NUM_EXPERTS * CHUNK
    e = tl.where(ok, key // CHUNK, 0)
    tl.store(sorted_ptr + tl.gather(first, e, 0) + i, chunk_start + key % CHUNK, mask=ok)


# Sizes that follow the token count are runtime ints, never constexpr, and not specialized either: one
# compiled variant serves every step (a new constexpr value would compile on the serving path).
@triton.jit(do_not_specialize=["num_pairs", "num_blocks"])
def _align_small_kernel(
    ids_ptr, sorted_ptr, expert_ids_ptr, num_post_pad_ptr, num_pairs, num_blocks,
    NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr, N_PAD: tl.constexpr, E_PAD: tl.constexpr,
    FILL: tl.constexpr, SORT: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # the ids are the router's output (kernels/pdl.py)
    pdl_release(PDL)
    i = tl.arange(0, N_PAD)
    ids = tl.load(ids_ptr + i, mask=i < num_pairs, other=-1)
    valid = (i < num_pairs) & (ids >= 0) & (ids < NUM_EXPERTS)
    safe_ids = tl.where(valid, ids, 0).to(tl.int32)  # int64 ids too (the interpreter's histogram takes int32)
    counts = tl.histogram(safe_ids, E_PAD, mask=valid)
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    ends = tl.cumsum(padded, 0)
    total = tl.sum(padded, 0)
    for f0 in range(0, num_blocks * BLOCK_M, FILL):
        f = f0 + tl.arange(0, FILL)
        tl.store(sorted_ptr + f, tl.full([FILL], 0, tl.int32) + num_pairs, mask=f < num_blocks * BLOCK_M)
    tl.debug_barrier()  # the fill above must land before the scatter below
    if SORT:
        _scatter_sorted(sorted_ptr, safe_ids, valid, ends - padded - (tl.cumsum(counts, 0) - counts), 0,
                        NUM_EXPERTS, N_PAD)
    else:
        pos = tl.gather(ends - padded, safe_ids, 0) + _rank_in_chunk(ids_ptr, ids, 0, num_pairs, N_PAD, 16)
        tl.store(sorted_ptr + pos, i, mask=valid)
    _write_expert_ids(ends, expert_ids_ptr, total, 0, num_blocks, BLOCK_M, 64)
    tl.store(num_post_pad_ptr, total)


@triton.jit(do_not_specialize=["num_pairs", "sorted_len", "fill_per_program", "num_chunks"])
def _align_count_kernel(
    ids_ptr, chunk_counts_ptr, sorted_ptr, ends_ptr, num_post_pad_ptr, counter_ptr, num_pairs, sorted_len,
    fill_per_program, num_chunks,
    NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
    ROWS: tl.constexpr, SCAN: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # the ids are the router's output (kernels/pdl.py)
    pdl_release(PDL)
    # chunk_counts [num_chunks, E_PAD]: how many of this chunk's pairs go to each expert
    pid = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    i = pid * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + i, mask=i < num_pairs, other=-1)
    valid = (i < num_pairs) & (ids >= 0) & (ids < NUM_EXPERTS)
    hist = tl.histogram(tl.where(valid, ids, 0).to(tl.int32), E_PAD, mask=valid)  # (int64 ids: int32)
    tl.store(chunk_counts_ptr + pid * E_PAD + e, hist)
    for f0 in range(0, fill_per_program, CHUNK):  # padding sentinel for this program's share
        f = f0 + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + pid * fill_per_program + f, tl.full([CHUNK], 0, tl.int32) + num_pairs,
                 mask=(pid * fill_per_program + f < sorted_len) & (f < fill_per_program))
    if SCAN:
        # the last program to arrive turns the counts into each chunk's first slot per expert relative to the
        # expert's segment (chunk_counts rewritten in place, one pass: the segment starts are known only at its
        # end) and writes the experts' padded segment ends and num_post_pad: the scatter programs then read one
        # row and the ends instead of every chunk's counts
        tl.debug_barrier()  # every thread's count stores precede the release of the counter
        if tl.atomic_add(counter_ptr, 1, sem="acq_rel") == num_chunks - 1:
            running = tl.zeros([E_PAD], tl.int32)  # each expert's pairs in the chunks before
            for c0 in range(0, num_chunks, ROWS):
                c = c0 + tl.arange(0, ROWS)
                cmask = (c < num_chunks)[:, None]
                # .cg: the other programs' rows were written by other SMs, never through this SM's L1
                cc = tl.load(chunk_counts_ptr + c[:, None] * E_PAD + e[None, :], mask=cmask, other=0,
                             cache_modifier=".cg")
                tl.store(chunk_counts_ptr + c[:, None] * E_PAD + e[None, :],
                         running[None, :] + tl.cumsum(cc, 0) - cc, mask=cmask)
                running += tl.sum(cc, 0)
            padded = tl.cdiv(running, BLOCK_M) * BLOCK_M
            tl.store(ends_ptr + e, tl.cumsum(padded, 0))
            tl.store(num_post_pad_ptr, tl.sum(padded, 0))
            tl.atomic_xchg(counter_ptr, 0)  # ready for the next launch (CUDA graph replays reuse the buffer)


@triton.jit(do_not_specialize=["num_pairs", "num_chunks", "num_blocks"])
def _align_scatter_kernel(
    ids_ptr, chunk_counts_ptr, sorted_ptr, expert_ids_ptr, ends_ptr, num_post_pad_ptr, num_pairs, num_chunks,
    num_blocks, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
    ROWS: tl.constexpr, SCAN: tl.constexpr, SORT: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pdl_wait(PDL)  # the counts are the count kernel's output (kernels/pdl.py)
    pdl_release(PDL)
    # pair i goes to start[e] + (pairs of e in earlier chunks) + (rank among e's pairs in this chunk)
    pid = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    if SCAN:  # the count kernel's last program did the sums: an expert's segment starts where the one before ends
        ends = tl.load(ends_ptr + e)
        base = tl.load(chunk_counts_ptr + pid * E_PAD + e) + tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
        total = tl.load(num_post_pad_ptr)
    else:  # each program sums every chunk's counts itself
        totals = tl.zeros([E_PAD], tl.int32)
        before = tl.zeros([E_PAD], tl.int32)
        for c0 in range(0, num_chunks, ROWS):
            c = c0 + tl.arange(0, ROWS)
            cc = tl.load(chunk_counts_ptr + c[:, None] * E_PAD + e[None, :], mask=(c < num_chunks)[:, None], other=0)
            totals += tl.sum(cc, 0)
            before += tl.sum(tl.where((c < pid)[:, None], cc, 0), 0)
        padded = tl.cdiv(totals, BLOCK_M) * BLOCK_M
        ends = tl.cumsum(padded, 0)
        base = ends - padded + before
        total = tl.sum(padded, 0)
    i = pid * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + i, mask=i < num_pairs, other=-1)
    valid = (i < num_pairs) & (ids >= 0) & (ids < NUM_EXPERTS)
    safe_ids = tl.where(valid, ids, 0).to(tl.int32)  # int64 ids too (the interpreter's histogram takes int32)
    if SORT:
        hist = tl.histogram(safe_ids, E_PAD, mask=valid)  # this chunk's pairs of each expert
        _scatter_sorted(sorted_ptr, safe_ids, valid, base - (tl.cumsum(hist, 0) - hist), pid * CHUNK, NUM_EXPERTS,
                        CHUNK)
    else:
        pos = tl.gather(base, safe_ids, 0) + _rank_in_chunk(ids_ptr, ids, pid * CHUNK, num_pairs, CHUNK, 32)
        tl.store(sorted_ptr + pos, i, mask=valid)
    # every program knows every expert's segment: each writes its share of the block experts
    share = tl.cdiv(num_blocks, num_chunks)
    _write_expert_ids(ends, expert_ids_ptr, total, pid * share, tl.minimum(pid * share + share, num_blocks),
                      BLOCK_M, 64)
    if pid == 0 and not SCAN:
        tl.store(num_post_pad_ptr, total)


_COUNTERS: dict = {}  # the count kernel's arrivals, one int32 per device (kernels.zeroed_counters)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _e_pad(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))  # the histogram's bins


def _chunk_cap(e_pad: int, sort: bool) -> int:
    # the pairwise rank's one-hot [chunk, e_pad] tile stays <= 32k elements; the sort rank has none
    return SORT_MAX_CHUNK if sort else max(16, 32768 // e_pad)


def _chunk(num_pairs: int, e_pad: int, sort: bool) -> int:
    # pairs per program of the two launches. pairwise: 64, doubled until <= ALIGN_CHUNKS programs, up to its cap;
    # sort: 256 below SORT_CHUNK x ALIGN_CHUNKS pairs (16384), SORT_CHUNK from there (beyond SCAN_CHUNKS chunks the
    # count kernel's SCAN sums them)
    if sort:
        return 256 if num_pairs < SORT_CHUNK * ALIGN_CHUNKS else SORT_CHUNK
    return min(SMALL_PAIRS, _chunk_cap(e_pad, False), max(64, triton.next_power_of_2(-(-num_pairs // ALIGN_CHUNKS))))


def align_plan(
    num_pairs: int, num_experts: int, one_program_pairs: int = ONE_PROGRAM_PAIRS, chunk: int | None = None,
    scan_chunks: int | None = None, rank: str | None = None,
) -> tuple[int, int, bool, bool]:
    """(N_PAD, CHUNK, SCAN, SORT) of a call on num_pairs > 0 pairs, the constexprs that follow the pair count (each
    new one compiles): (N_PAD, 0, False, SORT) for the one program, (0, CHUNK, SCAN, SORT) for the two launches;
    SORT: the sort rank (rank None: ALIGN_RANK; "auto": sort from SORT_FROM_PAIRS pairs)."""
    rank = ALIGN_RANK if rank is None else rank
    if rank == "auto":
        rank = "sort" if num_pairs >= SORT_FROM_PAIRS else "pairwise"
    if rank not in RANKS:
        raise ValueError(f"align rank must be 'auto' or one of {RANKS}, got {rank!r}")
    sort, e_pad = rank == "sort", _e_pad(num_experts)
    if num_pairs <= min(one_program_pairs, SORT_MAX_CHUNK if sort else SMALL_PAIRS):
        return max(16, triton.next_power_of_2(num_pairs)), 0, False, sort
    chunk = min(chunk, _chunk_cap(e_pad, sort)) if chunk else _chunk(num_pairs, e_pad, sort)
    return 0, chunk, triton.cdiv(num_pairs, chunk) > (SCAN_CHUNKS if scan_chunks is None else scan_chunks), sort


def align_token_ranges(max_tokens: int, top_k: int, num_experts: int) -> list[tuple[int, int]]:
    """[first, last] token counts (1..max_tokens) over which align_plan(tokens * top_k, num_experts) stays the same,
    in order: the plan grows with the pairs, so each is one range, its end found by bisection."""
    ranges, first = [], 1
    while first <= max_tokens:
        plan, lo, hi = align_plan(first * top_k, num_experts), first, max_tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if align_plan(mid * top_k, num_experts) == plan else (lo, mid - 1)
        ranges.append((first, lo))
        first = lo + 1
    return ranges


def moe_align(
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int32, -1 = skip
    num_experts: int,
    block_m: int,
    one_program_pairs: int = ONE_PROGRAM_PAIRS,  # <= SMALL_PAIRS (sort: SORT_MAX_CHUNK); bench_align.py times both
    chunk: int | None = None,  # pairs a program of the two launches takes (a power of two >= 32); None: _chunk
    scan_chunks: int | None = None,  # more chunks than this: the count kernel's last program sums; None: SCAN_CHUNKS
    rank: str | None = None,  # "auto", "pairwise" or "sort" (RANKS): how a program ranks its pairs; None: ALIGN_RANK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if topk_ids.dtype not in (torch.int32, torch.int64) or not topk_ids.is_contiguous():
        raise ValueError(f"topk_ids must be contiguous int32/int64, got {topk_ids.dtype}")
    device = topk_ids.device
    # the count kernel's arrival counter (SCAN), allocated by the first call on the device whatever its size, so
    # on an eager run: made inside a CUDA graph capture, it would be zeroed only by that graph's replays, and an
    # eager call or another graph before its first replay would count on garbage
    counter = _COUNTERS.get(device)
    if counter is None and not _capturing(device):
        counter = zeroed_counters(_COUNTERS, 1, device, 1)
    num_pairs = topk_ids.numel()
    nblocks = max_blocks(num_pairs, num_experts, block_m)
    sorted_ids = torch.empty(nblocks * block_m, dtype=torch.int32, device=device)
    expert_ids = torch.empty(nblocks, dtype=torch.int32, device=device)
    num_post_pad = torch.empty(1, dtype=torch.int32, device=device)
    if num_pairs == 0:
        num_post_pad.zero_()
        return sorted_ids, expert_ids, num_post_pad
    e_pad = _e_pad(num_experts)
    pdl = pdl_enabled(device)
    if chunk is not None and (chunk < 32 or chunk & (chunk - 1)):
        raise ValueError(f"align chunk must be a power of two >= 32, got {chunk}")
    n_pad, chunk, scan, sort = align_plan(num_pairs, num_experts, one_program_pairs, chunk, scan_chunks, rank)
    if n_pad:
        _align_small_kernel[(1,)](
            topk_ids, sorted_ids, expert_ids, num_post_pad, num_pairs, nblocks,
            NUM_EXPERTS=num_experts, BLOCK_M=block_m, N_PAD=n_pad,
            E_PAD=e_pad, FILL=1024, SORT=sort, PDL=pdl, num_warps=8, **launch_kwargs(pdl),
        )
        return sorted_ids, expert_ids, num_post_pad
    num_chunks = triton.cdiv(num_pairs, chunk)
    chunk_counts = torch.empty(num_chunks, e_pad, dtype=torch.int32, device=device)
    fill = triton.cdiv(triton.cdiv(nblocks * block_m, num_chunks), chunk) * chunk
    if scan and counter is None:
        raise RuntimeError("moe_align: a CUDA graph capture holds the first call on this device; call moe_align "
                           "eagerly once before capturing")
    # SCAN only: the experts' padded segment ends, and the arrival counter (without SCAN both unused)
    ends = torch.empty(e_pad, dtype=torch.int32, device=device) if scan else num_post_pad
    counter = counter if scan else num_post_pad
    rows = max(1, min(32, 4096 // e_pad))
    _align_count_kernel[(num_chunks,)](
        topk_ids, chunk_counts, sorted_ids, ends, num_post_pad, counter, num_pairs, nblocks * block_m, fill,
        num_chunks, NUM_EXPERTS=num_experts, BLOCK_M=block_m, E_PAD=e_pad, CHUNK=chunk, ROWS=rows, SCAN=scan,
        PDL=pdl, num_warps=4, **launch_kwargs(pdl),
    )
    _align_scatter_kernel[(num_chunks,)](
        topk_ids, chunk_counts, sorted_ids, expert_ids, ends, num_post_pad, num_pairs, num_chunks, nblocks,
        NUM_EXPERTS=num_experts, BLOCK_M=block_m, E_PAD=e_pad, CHUNK=chunk, ROWS=rows, SCAN=scan, SORT=sort,
        PDL=pdl, num_warps=8, **launch_kwargs(pdl),
    )
    return sorted_ids, expert_ids, num_post_pad
