"""Causal paged prefill attention for Hopper (sm90) in Gluon, FlashAttention-3 style.

Same contract as kernels/attention/prefill.py's paged_attention_prefill (varlen via cu_seqlens_q / seq_lens, the query
block at the end of each sequence's KV range, so an extend over a cached prefix too; GQA; paged K/V through
block_tables; tokens no sequence owns read zero), for a 16-bit cache of q's dtype without scales, head_dim 64 or 128,
pages of 16..256 tokens, int32 index tensors and no tile map (gluon_fits). Triton 3.6 warp-specializes tl.range loops
only on sm100+, so on Hopper the Triton kernel's softmax and its two dots never overlap. Here, per program (one query
head, BLOCK_M = 128 query tokens, GQA heads not packed: each reads its KV head's tiles, shared through L2):

- a load partition (one warp) reads the page ids from block_tables and fills a ring of NUM_STAGES K and V tiles
  [BLOCK_N, head_dim] by TMA over the cache viewed as [num_blocks * block_size, kv_heads * head_dim]: one box
  [min(block_size, BLOCK_N), head_dim] at column kvh * head_dim per page of the tile, all onto one barrier (keys past
  the range read zeros: their box starts at a row past the view's end, which TMA fills with zeros);
- the default partition (num_warps = 8: two warpgroups, 64 query rows each) keeps q in shared memory and issues
  S_j = Q K_j^T as async wgmma before P_{j-1} V_{j-1} (P from registers as the A operand), so the tensor cores run
  the next tile's QK^T and the previous tile's PV while this tile's online softmax (base 2, the scale folded into
  one FFMA per score) runs: FA3's intra-warpgroup overlap; the causal mask only on the tiles the diagonal crosses;
  the output leaves through q's buffer as coalesced rows. The "gluon" entry's split_wg 1 runs the two warpgroups as
  two partitions instead, 2 the same taking turns to issue their wgmmas (FA3's ping-pong; _prefill_gluon_kernel).

Keys past a sequence's end inside its last page are read as the page holds them (masked to p = 0): the runtime's
cache starts zeroed (model_runner), so they are finite and 0 * v adds nothing (a NaN there would reach the output,
as in any kernel that reads whole pages through TMA).

Gluon has no interpreter: on the CPU the tests compile this for sm90 (tests/test_attention_gluon.py); outputs are
compared with the torch reference and the Triton kernel on a GPU. Dispatch: a prefill config's "gluon"
(kernels/attention/config.py; the H200 table's bf16 entry, split_wg 1, from GLUON_MIN_Q = 2048 query tokens: 0.79-0.84
of the matmul rate at 4k-16k against the Triton kernel's 0.59-0.68, benchmarks/RESULTS.md session 12), on sm90, for
the shapes gluon_supported() accepts.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

GLUON_KEYS = ("BLOCK_M", "BLOCK_N", "num_stages", "load_regs", "split_wg")  # a "gluon" entry's keys (all optional)
GLUON_DEFAULTS = {"BLOCK_M": 128, "BLOCK_N": 128, "num_stages": 2, "load_regs": 24, "split_wg": 0}
HEAD_DIMS = (64, 128)  # head dims the kernel runs (256: S, P and O would not fit the registers together)
SHARED_LIMIT = 232448  # bytes of shared memory one H100/H200 block may hold (227 KB)
_LOG2E = 1.4426950408889634
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@gluon.jit
def _load_partition(k_desc, v_desc, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, bt_ptr, kvh, kv_end,
                    n_tiles, BLOCK_SIZE: gl.constexpr):
    # K_j then V_j for every key tile j of this program, NUM_STAGES tiles ahead of the MMAs at most
    NUM_STAGES: gl.constexpr = k_bufs.shape[0]
    BLOCK_N: gl.constexpr = k_bufs.shape[1]
    HEAD_DIM: gl.constexpr = k_bufs.shape[2]
    BOX: gl.constexpr = k_desc.block_type.shape[0]  # keys a box: min(block_size, BLOCK_N)
    TILE_BYTES: gl.constexpr = BLOCK_N * HEAD_DIM * k_desc.dtype.primitive_bitwidth // 8
    past_end = k_desc.shape[0]  # a box from this row on is wholly out of bounds: TMA writes zeros
    col = kvh * HEAD_DIM
    for j in range(n_tiles):
        s = j % NUM_STAGES
        phase = (j // NUM_STAGES) & 1
        # a fresh barrier counts as having finished the phase before 0: the first lap does not wait
        mbarrier.wait(k_empty.index(s), phase ^ 1)
        mbarrier.expect(k_ready.index(s), TILE_BYTES)  # the zero fill of a box past the end counts too
        for i in gl.static_range(BLOCK_N // BOX):
            row = _box_row(bt_ptr, j * BLOCK_N + i * BOX, kv_end, past_end, BLOCK_SIZE)
            tma.async_copy_global_to_shared(k_desc, [row, col], k_ready.index(s), k_bufs.index(s).slice(i * BOX, BOX))
        mbarrier.wait(v_empty.index(s), phase ^ 1)
        mbarrier.expect(v_ready.index(s), TILE_BYTES)
        for i in gl.static_range(BLOCK_N // BOX):  # the page ids again: L1 hits, no registers held across
            row = _box_row(bt_ptr, j * BLOCK_N + i * BOX, kv_end, past_end, BLOCK_SIZE)
            tma.async_copy_global_to_shared(v_desc, [row, col], v_ready.index(s), v_bufs.index(s).slice(i * BOX, BOX))


@gluon.jit
def _box_row(bt_ptr, n, kv_end, past_end, BLOCK_SIZE: gl.constexpr):
    # the cache row (of the [num_blocks * block_size, ...] view) holding key n, or past_end for a key at or past
    # kv_end (its page id may be a stale or padding entry: never read it)
    page = gl.load(bt_ptr + gl.minimum(n, kv_end - 1) // BLOCK_SIZE)
    return gl.where(n < kv_end, page * BLOCK_SIZE + n % BLOCK_SIZE, past_end)


@gluon.jit
def _softmax_tile(s, m_i, l_i, qk_scale, n0, q_pos, mask_from, s_layout: gl.constexpr):
    # one online-softmax step on the scores s [BLOCK_M, BLOCK_N] (QK^T, unscaled) of keys [n0, n0 + BLOCK_N); the
    # causal mask (key <= the row's position) only on a tile the diagonal crosses (n0 + BLOCK_N > mask_from); keys
    # past the sequence are past every row's position, masked with it. Every row sees key 0 in tile 0 (its position
    # is >= 0), so the running max is finite from tile 0 on: no -inf - -inf.
    BLOCK_N: gl.constexpr = s.shape[1]
    if n0 + BLOCK_N > mask_from:
        keys = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(keys[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)  # scaled (base-2) units; qk_scale > 0 commutes with the max
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon.jit
def _take_turn(turn_bars, k, WG: gl.constexpr, PINGPONG: gl.constexpr):
    # PINGPONG: warpgroup WG issues its k-th group of wgmmas only after the other one issued its own (WG 0 first: a
    # fresh barrier passes a wait on parity 1), so their softmaxes alternate under each other's MMAs (FA3's
    # ping-pong); one arrive a turn (_pass_turn) completes a phase of the other's barrier
    if PINGPONG:
        mbarrier.wait(turn_bars.index(WG), (k & 1) ^ (1 - WG))


@gluon.jit
def _pass_turn(turn_bars, WG: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn_bars.index(1 - WG))


@gluon.jit
def _mma_partition(q_ptr, out_ptr, q_smem, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, turn_bars, qk_scale,
                   q_start, q_len, row0, head, ctx, n_tiles, stride_qt, stride_qh, stride_ot, stride_oh,
                   WG: gl.constexpr, PINGPONG: gl.constexpr, num_warps: gl.constexpr):
    # query tokens [row0, row0 + BLOCK_M) of the sequence (BLOCK_M = q_smem's rows: 64 a warpgroup of num_warps);
    # WG: which warpgroup partition this is (PINGPONG only: turns with the other)
    NUM_STAGES: gl.constexpr = k_bufs.shape[0]
    BLOCK_M: gl.constexpr = q_smem.shape[0]
    HEAD_DIM: gl.constexpr = q_smem.shape[1]
    BLOCK_N: gl.constexpr = k_bufs.shape[1]
    dtype: gl.constexpr = q_smem.dtype
    # accumulators: warpgroups stacked along M (64 rows each); S one wgmma of N = BLOCK_N, O one of N = HEAD_DIM
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)  # P as wgmma's A
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // HEAD_DIM, HEAD_DIM // 8], [num_warps, 1], [1, 0])

    # q [BLOCK_M, HEAD_DIM] of this head: plain loads (rows past the sequence read zeros) into shared memory
    tok = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, io_layout))
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io_layout))
    rmask = (tok < q_len)[:, None]
    q_off = (q_start + tok).to(gl.int64)[:, None] * stride_qt + head * stride_qh + d[None, :]
    q_smem.store(gl.load(q_ptr + q_off, mask=rmask, other=0.0))
    fence_async_shared()

    q_pos = ctx + row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    mask_from = ctx + row0 + 1  # keys below the first row's position are visible to every row
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))

    # tile 0: its scores alone (nothing to overlap with yet)
    mbarrier.wait(k_ready.index(0), 0)
    _take_turn(turn_bars, 0, WG, PINGPONG)
    s_tok = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    _pass_turn(turn_bars, WG, PINGPONG)
    s = warpgroup_mma_wait(0, deps=(s_tok,))
    mbarrier.arrive(k_empty.index(0))
    p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, qk_scale, 0, q_pos, mask_from, s_layout)
    p = gl.convert_layout(p.to(dtype), p_layout)
    for j in range(1, n_tiles):
        ks = j % NUM_STAGES
        vs = (j - 1) % NUM_STAGES
        mbarrier.wait(k_ready.index(ks), (j // NUM_STAGES) & 1)
        mbarrier.wait(v_ready.index(vs), ((j - 1) // NUM_STAGES) & 1)
        _take_turn(turn_bars, j, WG, PINGPONG)
        s_tok = warpgroup_mma(q_smem, k_bufs.index(ks).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc_tok = warpgroup_mma(p, v_bufs.index(vs), acc, is_async=True)
        _pass_turn(turn_bars, WG, PINGPONG)
        # at most one group in flight: this tile's QK^T (issued first) is done, the previous tile's PV may run on
        # through the softmax below
        s = warpgroup_mma_wait(1, deps=(s_tok,))
        mbarrier.arrive(k_empty.index(ks))
        p_new, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, qk_scale, j * BLOCK_N, q_pos, mask_from, s_layout)
        p_new = gl.convert_layout(p_new.to(dtype), p_layout)
        # the previous PV done (p's registers, its operand, stay live until here), then its V stage is free
        acc, p = warpgroup_mma_wait(0, deps=(acc_tok, p))
        mbarrier.arrive(v_empty.index(vs))
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p = p_new
    vs = (n_tiles - 1) % NUM_STAGES
    mbarrier.wait(v_ready.index(vs), ((n_tiles - 1) // NUM_STAGES) & 1)
    _take_turn(turn_bars, n_tiles, WG, PINGPONG)
    acc_tok = warpgroup_mma(p, v_bufs.index(vs), acc, is_async=True)
    _pass_turn(turn_bars, WG, PINGPONG)
    acc, p = warpgroup_mma_wait(0, deps=(acc_tok, p))
    mbarrier.arrive(v_empty.index(vs))

    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    # through q's buffer (every QK^T is done) into coalesced rows: no layout-change scratch, which leaves room
    # for a third K/V stage at BLOCK_N 128
    q_smem.store((acc / l_o[:, None]).to(dtype))
    o = q_smem.load(io_layout)
    o_off = (q_start + tok).to(gl.int64)[:, None] * stride_ot + head * stride_oh + d[None, :]
    gl.store(out_ptr + o_off, o, mask=rmask)


@gluon.jit
def _zero_rows(out_ptr, start, end, head, stride_ot, stride_oh, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
               num_warps: gl.constexpr):
    # out[start:end, head] = 0 (end - start <= BLOCK_M)
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // HEAD_DIM, HEAD_DIM // 8], [num_warps, 1], [1, 0])
    t = start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    off = t.to(gl.int64)[:, None] * stride_ot + head * stride_oh + d[None, :]
    gl.store(out_ptr + off, gl.zeros([BLOCK_M, HEAD_DIM], out_ptr.dtype.element_ty, layout), mask=(t < end)[:, None])


@gluon.jit(do_not_specialize=["stride_bt", "num_tokens", "batch"])
def _prefill_gluon_kernel(q_ptr, out_ptr, k_desc, v_desc, cu_seqlens_ptr, seq_lens_ptr, block_tables_ptr, qk_scale,
                          stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, num_tokens, batch,
                          GROUP: gl.constexpr, BLOCK_SIZE: gl.constexpr, BLOCK_M: gl.constexpr,
                          BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, LOAD_REGS: gl.constexpr,
                          SPLIT_WG: gl.constexpr, PINGPONG: gl.constexpr, num_warps: gl.constexpr):
    # grid (num_heads, query blocks, batch + 1): heads fastest, so a KV head's GROUP query heads run together and
    # share its K/V through L2; the last (longest) query block first. q / out [num_tokens, num_heads, HEAD_DIM];
    # k_desc / v_desc over the cache as [num_blocks * block_size, kv_heads * HEAD_DIM], box [min(bs, BLOCK_N), D].
    # SPLIT_WG: the two warpgroups as two partitions of 64 rows each (num_warps 4), each releasing a K/V stage on
    # its own (empty barriers of count 2): no CTA-wide sync between them, so one's softmax can run under the
    # other's wgmmas (left to drift), or PINGPONG: taking turns to issue them (FA3's ping-pong scheduling, through a
    # pair of mbarriers); else one partition of num_warps 8.
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[1]
    head = gl.program_id(0)
    num_qb = gl.num_programs(1)
    qb = num_qb - 1 - gl.program_id(1)
    b = gl.program_id(2)
    if b == batch:  # the padding slot: zeros over the tokens no sequence owns (out starts empty)
        lead = gl.load(cu_seqlens_ptr)
        for t0 in range(qb * BLOCK_M, lead, num_qb * BLOCK_M):
            _zero_rows(out_ptr, t0, gl.minimum(lead, t0 + BLOCK_M), head, stride_ot, stride_oh, BLOCK_M, HEAD_DIM,
                       num_warps)
        tail = gl.load(cu_seqlens_ptr + batch)
        for t0 in range(tail + qb * BLOCK_M, num_tokens, num_qb * BLOCK_M):
            _zero_rows(out_ptr, t0, gl.minimum(num_tokens, t0 + BLOCK_M), head, stride_ot, stride_oh, BLOCK_M,
                       HEAD_DIM, num_warps)
        return
    q_start = gl.load(cu_seqlens_ptr + b)
    q_len = gl.load(cu_seqlens_ptr + b + 1) - q_start
    seq_len = gl.load(seq_lens_ptr + b)
    if qb * BLOCK_M >= q_len:
        return
    ctx = gl.maximum(seq_len - q_len, 0)  # the cached prefix before this chunk
    kv_end = gl.minimum(seq_len, ctx + (qb + 1) * BLOCK_M)  # keys the block's last row sees, + 1
    if kv_end <= 0:  # a sequence with no keys: zeros
        _zero_rows(out_ptr, q_start + qb * BLOCK_M, q_start + gl.minimum(q_len, (qb + 1) * BLOCK_M), head,
                   stride_ot, stride_oh, BLOCK_M, HEAD_DIM, num_warps)
        return
    n_tiles = gl.cdiv(kv_end, BLOCK_N)
    dtype: gl.constexpr = k_desc.dtype
    CONSUMERS: gl.constexpr = 2 if SPLIT_WG else 1
    WG_M: gl.constexpr = BLOCK_M // CONSUMERS
    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, WG_M, HEAD_DIM],
                                       gl.NVMMASharedLayout.get_default_for([WG_M, HEAD_DIM], dtype))
    k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(turn_bars.index(i), count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=CONSUMERS)
    bt_ptr = block_tables_ptr + b.to(gl.int64) * stride_bt
    load_args = (k_desc, v_desc, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, bt_ptr, head // GROUP, kv_end,
                 n_tiles, BLOCK_SIZE)
    if SPLIT_WG:
        gl.warp_specialize([
            (_mma_partition, (q_ptr, out_ptr, q_smem.index(0), k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty,
                              turn_bars, qk_scale, q_start, q_len, qb * BLOCK_M, head, ctx, n_tiles, stride_qt,
                              stride_qh, stride_ot, stride_oh, 0, PINGPONG, num_warps)),
            (_mma_partition, (q_ptr, out_ptr, q_smem.index(1), k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty,
                              turn_bars, qk_scale, q_start, q_len, qb * BLOCK_M + WG_M, head, ctx, n_tiles,
                              stride_qt, stride_qh, stride_ot, stride_oh, 1, PINGPONG, num_warps)),
            (_load_partition, load_args),
        ], [num_warps, 1], [240, LOAD_REGS])
    else:
        gl.warp_specialize([
            (_mma_partition, (q_ptr, out_ptr, q_smem.index(0), k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty,
                              turn_bars, qk_scale, q_start, q_len, qb * BLOCK_M, head, ctx, n_tiles, stride_qt,
                              stride_qh, stride_ot, stride_oh, 0, False, num_warps)),
            (_load_partition, load_args),
        ], [1], [LOAD_REGS])


# ---------------------------------------------------------------- host side


def gluon_config(cfg: dict, head_dim: int = 128) -> dict | None:
    """The Gluon tiles a prefill config asks for: None when its "gluon" key is absent or 0; 1 (the defaults) or a dict
    of GLUON_KEYS. A bad value (or tiles over shared memory at this head_dim): a one-line ValueError."""
    g = cfg.get("gluon", 0)
    if g is None or g is False or g == 0:
        return None
    if g is True or g == 1:
        g = {}
    elif not isinstance(g, dict):
        raise ValueError(f"prefill config gluon={g!r} must be 0, 1 or a dict of {GLUON_KEYS}")
    if unknown := sorted(set(g) - set(GLUON_KEYS)):
        raise ValueError(f"prefill config gluon: unknown keys {unknown}; allowed {GLUON_KEYS}")
    g = {**GLUON_DEFAULTS, **g}
    if g["BLOCK_M"] != 128 or g["BLOCK_N"] not in (64, 128):
        raise ValueError(f"prefill config gluon: BLOCK_M {g['BLOCK_M']} / BLOCK_N {g['BLOCK_N']}: need BLOCK_M 128 "
                         "(two warpgroups of 64 rows) and BLOCK_N 64 or 128")
    if g["split_wg"] not in (0, 1, 2):
        raise ValueError(f"prefill config gluon: split_wg {g['split_wg']!r} must be 0, 1 or 2 (ping-pong)")
    # load_regs: the load warpgroup's registers; the MMA warpgroups share the rest of 504 (sm90 TTGIR: 8 warps
    # (504 - load_regs) / 2 each, split_wg 504 - 240 - load_regs for the first): at 88 split_wg spills, at 152 the
    # 8 warps do, at 256 ptxas fails. The load warp needs 24
    if not 2 <= g["num_stages"] <= 4 or not 24 <= g["load_regs"] <= 64 or g["load_regs"] % 8:
        raise ValueError(f"prefill config gluon: num_stages {g['num_stages']} / load_regs {g['load_regs']}: need "
                         "num_stages 2..4 (the K/V ring) and load_regs a multiple of 8 in 24..64")
    if head_dim in HEAD_DIMS and (smem := shared_bytes(g, head_dim)) > SHARED_LIMIT:  # (others: the Triton kernel)
        raise ValueError(f"prefill config gluon: {smem} bytes of shared memory at head_dim {head_dim} over the "
                         f"{SHARED_LIMIT} a block may hold: fewer num_stages or BLOCK_N 64")
    return g


def shared_bytes(g: dict, head_dim: int, elem: int = 2) -> int:
    """The kernel's shared memory: q, the K and V rings, the output's layout change (a [BLOCK_M, head_dim] fp32-wide
    scratch at most) and the barriers."""
    return g["BLOCK_M"] * head_dim * elem + 2 * g["num_stages"] * g["BLOCK_N"] * head_dim * elem + 32 * g["num_stages"]


def gluon_supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, g: dict, k_scale: float, v_scale: float,
                    tile_map: torch.Tensor | None) -> bool:
    """Whether the Gluon kernel runs this call: an sm90 GPU and a call gluon_fits."""
    return (q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0)
            and gluon_fits(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, g, k_scale, v_scale, tile_map))


def gluon_fits(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
               seq_lens: torch.Tensor, block_tables: torch.Tensor, g: dict, k_scale: float, v_scale: float,
               tile_map: torch.Tensor | None) -> bool:
    """The shapes the kernel takes (any device): a 16-bit cache of q's dtype without scales, head_dim 64 or 128, a
    cache whose [num_blocks * block_size, kv_heads * head_dim] view a TMA descriptor takes, pages of a power of two
    16..256 tokens (8-token pages: 16 boxes a tile, the load warp spills at sm90), int32 index tensors, the eager
    grid (no tile map), and the tiles within shared memory."""
    if q.dtype not in _GL_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return False
    if tile_map is not None or k_scale != 1 or v_scale != 1:
        return False
    if any(t.dtype != torch.int32 for t in (cu_seqlens_q, seq_lens, block_tables)):  # 32-bit TMA row coordinates
        return False
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    if head_dim not in HEAD_DIMS or block_size < 16 or block_size & (block_size - 1) or block_size > 256:
        return False
    if num_blocks * block_size >= 2**31 or shared_bytes(g, head_dim) > SHARED_LIMIT:
        return False
    for c in (k_cache, v_cache):
        if c.stride() != (block_size * kv_heads * head_dim, kv_heads * head_dim, head_dim, 1) or c.data_ptr() % 16:
            return False
    return True


def _launch_warps(g: dict) -> tuple[int, int]:
    """(num_warps, maxnreg) of a launch: the default partition's warps (both warpgroups, or one under split_wg), and
    the register file (64K) over all 12 warps (the two MMA warpgroups, the load warp's warpgroup), a multiple of 8;
    setmaxnreg then moves the load warpgroup's share to the MMA warps."""
    return (4 if g["split_wg"] else 8), 65536 // (32 * 12) // 8 * 8


def kv_descriptor(cache: torch.Tensor, g: dict) -> TensorDescriptor:
    """A TMA descriptor over one cache as [num_blocks * block_size, kv_heads * head_dim], box [min(block_size,
    BLOCK_N), head_dim]: one page (or a BLOCK_N slice of one) of one KV head."""
    num_blocks, block_size, kv_heads, head_dim = cache.shape
    box = [min(block_size, g["BLOCK_N"]), head_dim]
    layout = gl.NVMMASharedLayout.get_default_for(box, _GL_DTYPES[cache.dtype])
    return TensorDescriptor(cache, [num_blocks * block_size, kv_heads * head_dim], [kv_heads * head_dim, 1], box,
                            layout)


def paged_attention_prefill_gluon(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], q's dtype
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,  # [batch + 1] int32
    seq_lens: torch.Tensor,  # [batch] int32, kv length including the new tokens
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq] int32
    scale: float,
    max_seqlen_q: int,
    g: dict,  # gluon_config(...)'s tiles
) -> torch.Tensor:
    """paged_attention_prefill on the Gluon kernel (the caller checked gluon_supported)."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    batch = seq_lens.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    if batch == 0 or max_seqlen_q == 0:
        return out.zero_()
    block_m = g["BLOCK_M"]
    num_qb = triton.cdiv(max_seqlen_q, block_m)
    num_warps, maxnreg = _launch_warps(g)
    if num_qb > 65535 or batch + 1 > 65535:
        raise ValueError(f"prefill: {num_qb} query blocks / {batch} sequences: at most 65535 each per launch")
    _prefill_gluon_kernel[(num_heads, num_qb, batch + 1)](
        q, out, kv_descriptor(k_cache, g), kv_descriptor(v_cache, g), cu_seqlens_q, seq_lens, block_tables,
        scale * _LOG2E, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), num_tokens,
        batch, GROUP=num_heads // kv_heads, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=g["BLOCK_N"],
        NUM_STAGES=g["num_stages"], LOAD_REGS=g["load_regs"], SPLIT_WG=bool(g["split_wg"]),
        PINGPONG=g["split_wg"] == 2, num_warps=num_warps,
        maxnreg=maxnreg,
    )
    return out


# ---------------------------------------------------------------- sm90 compile (no GPU needed)


def compile_sm90(g: dict, heads: str = "32/4", block_size: int = 16, head_dim: int = 128, dtype: str = "bf16"):
    """The kernel as paged_attention_prefill_gluon would launch it (heads "q/kv"), compiled for sm90 on any machine
    (what ptxas made of it: tests/test_attention_gluon.py's probe, printed under pytest -s)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    num_heads, kv_heads = map(int, heads.split("/"))
    box = [min(block_size, g["BLOCK_N"]), head_dim]
    layout = gl.NVMMASharedLayout.get_default_for(box, gl.bfloat16 if dtype == "bf16" else gl.float16)
    desc = f"tensordesc<{dtype}[{box[0]}, {box[1]}],{layout!r}>"  # the signature a descriptor argument gets
    fn = _prefill_gluon_kernel
    num_warps, maxnreg = _launch_warps(g)
    consts = dict(GROUP=num_heads // kv_heads, BLOCK_SIZE=block_size, BLOCK_M=g["BLOCK_M"], BLOCK_N=g["BLOCK_N"],
                  NUM_STAGES=g["num_stages"], LOAD_REGS=g["load_regs"], SPLIT_WG=bool(g["split_wg"]),
                  PINGPONG=g["split_wg"] == 2, num_warps=num_warps)
    args = dict(q_ptr=f"*{dtype}", out_ptr=f"*{dtype}", k_desc=desc, v_desc=desc, cu_seqlens_ptr="*i32",
                seq_lens_ptr="*i32", block_tables_ptr="*i32", qk_scale="fp32")
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], constexprs[(i,)] = "constexpr", consts[name]
            continue
        sig[name] = args.get(name, "i32")
        # pointers and the q / out strides (multiples of head_dim) get a launch's divisibility by 16
        if sig[name].startswith("*") or name in ("stride_qt", "stride_qh", "stride_ot", "stride_oh"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(GluonASTSource(fn, sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "maxnreg": maxnreg})
