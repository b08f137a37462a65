"""Tile-level pieces of the paged attention kernels (kernels/attention/prefill.py, kernels/attention/decode.py): cache
row offsets from page ids and the prefill's online-softmax step over one key tile (from the paged cache, or
from this step's contiguous K/V through tensor descriptors), the zeros the eager prefill writes over tokens no
sequence owns, the decode's widening step and its split merge (the FP8 pieces: kernels/attention/fp8_dot.py). Shapes
in the comments."""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.attention.fp8_dot import P_LOG2_SCALE, _hold_fp8, _to_e4m3, _widen_fp8

MERGE_SPLITS = tl.constexpr(64)  # the decode merge's tile of splits: more splits are merged MERGE_SPLITS at a time


@triton.jit
def _kv_rows(page, n0, offs, kvh, stride_cb, stride_cs, stride_ch, BLOCK_SIZE: tl.constexpr, ALIGNED: tl.constexpr,
             OFF64: tl.constexpr):
    # [BLOCK_N] element offset of each key's row (this KV head) in a cache, from its page id; K and V share it
    if ALIGNED:  # every tile starts on a page boundary: the in-page part is the same each tile (hoisted)
        in_page = offs % BLOCK_SIZE
    else:
        in_page = (n0 + offs) % BLOCK_SIZE
    if OFF64:  # a cache of 2^31 elements or more
        page = page.to(tl.int64)
    return page * stride_cb + in_page * stride_cs + kvh * stride_ch


@triton.jit
def _softmax_step(s, v, s_mask, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr, FP8_DOT: tl.constexpr = False,
                  INTERP: tl.constexpr = False):
    # one online-softmax step from the scores s [BLOCK_M, BLOCK_N] (QK^T, not yet scaled): v [BLOCK_N, BLOCK_D] in
    # q's dtype, s_mask [BLOCK_M, BLOCK_N] (read only when MASKED), acc [BLOCK_M, BLOCK_D] fp32. (V's load sits after
    # the QK^T dot in the callers: with an FP8 cache, V widened before it took another 32 KiB of shared memory)
    # FP8_DOT: v is the e4m3 tile as stored, qk_scale a per-row [BLOCK_M] scale (q's dynamic scale folded in), and
    # p = exp2(score - max + P_LOG2_SCALE) in [0, 256] is rounded to e4m3 for an e4m3 x e4m3 PV dot; l_i sums the
    # unrounded p in the same units, so the 256 cancels in acc / l_i
    if MASKED:
        s = tl.where(s_mask, s, float("-inf"))
    # the running max is in scaled (base-2) units; scaling inside the exponent makes one FFMA per score
    # (qk_scale > 0: the max commutes with it)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past q_len may see no key yet
    alpha = tl.exp2(m_i - m_safe)
    if FP8_DOT:
        p = tl.exp2(s * qk_scale[:, None] - (m_safe - P_LOG2_SCALE)[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(_to_e4m3(p, INTERP), _hold_fp8(v, INTERP))
    else:
        p = tl.exp2(s * qk_scale - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def _prefill_tile(q, k_cache_ptr, v_cache_ptr, rows, n0, kv_end, q_pos, d, dmask, m_i, l_i, acc, qk_scale,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, MASK_FREE: tl.constexpr = False,
                  EVEN_D: tl.constexpr = False, FP8_DOT: tl.constexpr = False, INTERP: tl.constexpr = False):
    # one online-softmax step over keys [n0, n0 + BLOCK_N) whose cache rows start at `rows` [BLOCK_N];
    # q [BLOCK_M, BLOCK_D], acc [BLOCK_M, BLOCK_D]. An FP8 cache is widened to q's dtype (fp16) right after the
    # load (exact); its scales are in qk_scale and on the output. FP8_DOT: q is e4m3 already (the casts to q.dtype
    # keep the tiles as stored), qk_scale per row [BLOCK_M] (see _softmax_step)
    # MASK_FREE on an unmasked tile (every key < kv_end by construction): no key-bound predicate on the K/V
    # copies, and none at all when the head dim fills the tile (EVEN_D)
    n = n0 + tl.arange(0, BLOCK_N)
    offs = rows[:, None] + d[None, :]
    if MASK_FREE and not MASKED:
        if EVEN_D:
            k = tl.load(k_cache_ptr + offs).to(q.dtype)
            s = tl.dot(q, tl.trans(k)).to(tl.float32)
            v = tl.load(v_cache_ptr + offs).to(q.dtype)
        else:
            k = tl.load(k_cache_ptr + offs, mask=dmask[None, :], other=0.0).to(q.dtype)
            s = tl.dot(q, tl.trans(k)).to(tl.float32)
            v = tl.load(v_cache_ptr + offs, mask=dmask[None, :], other=0.0).to(q.dtype)
    else:
        kv_mask = (n < kv_end)[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k)).to(tl.float32)  # [BLOCK_M, BLOCK_N], not yet scaled
        v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
    s_mask = (n < kv_end)[None, :] & (n[None, :] <= q_pos[:, None])
    return _softmax_step(s, v, s_mask, m_i, l_i, acc, qk_scale, MASKED, FP8_DOT, INTERP)


@triton.jit
def _chunk_tile(q, k_desc, v_desc, row0, col, j0, tok, m_i, l_i, acc, qk_scale, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr):
    # the ragged path: keys j0 .. j0 + BLOCK_N - 1 of this step's own chunk (relative to its first token), read from
    # the contiguous [T, kv_heads * head_dim] K/V through tensor descriptors (TMA on Hopper) at row row0 + j0,
    # column col (the KV head's first dim). tok [BLOCK_M]: each row's token index in the chunk. Rows past the
    # chunk (the next sequence's keys, or zeros past T) are masked out on the diagonal tile, the only tile
    # that reaches them: j <= tok < q_len
    k = k_desc.load([row0 + j0, col])  # [BLOCK_N, BLOCK_D]
    s = tl.dot(q, tl.trans(k.to(q.dtype))).to(tl.float32)
    v = v_desc.load([row0 + j0, col])
    j = j0 + tl.arange(0, BLOCK_N)
    s_mask = j[None, :] <= tok[:, None]
    return _softmax_step(s, v.to(q.dtype), s_mask, m_i, l_i, acc, qk_scale, MASKED)


@triton.jit
def _zero_rows(out_ptr, t0, t1, head0, d, stride_ot, stride_oh, PACK: tl.constexpr, BLOCK_Q: tl.constexpr,
               BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, STEP):
    # zeros for tokens [t0, t1) x heads [head0, head0 + PACK), BLOCK_Q tokens at a time, then STEP on
    r = tl.arange(0, BLOCK_Q * PACK)
    head = head0 + r % PACK
    zero = tl.zeros([BLOCK_Q * PACK, BLOCK_D], out_ptr.dtype.element_ty)
    for s0 in range(t0, t1, STEP):
        tok = s0 + r // PACK
        off = tok.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + off, zero, mask=(tok < t1)[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def _merge_head(part_out_ptr, part_lse_ptr, out_ptr, b, h, d0, num_splits, stride_ob, stride_oh,
                NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr):
    # out[b, h, d0:d0+BLOCK_D] = sum_s exp2(lse_s - max) * part_s / sum_s exp2(lse_s - max), over [SPLITS_BLOCK,
    # BLOCK_D] tiles of splits in a fixed order (an online log-sum-exp merge: the same bits every run). Up to
    # MERGE_SPLITS splits it is one tile, bit for bit the single-tile merge; the chunks are unrolled, so every
    # chunk's loads are issued before the first one's sums. .cg: the partials were written by other SMs, never
    # through this SM's L1
    SPLITS_BLOCK: tl.constexpr = min(SPLITS_PAD, MERGE_SPLITS)
    d = d0 + tl.arange(0, BLOCK_D)
    m = float("-inf")
    total = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c in tl.static_range(0, SPLITS_PAD, SPLITS_BLOCK):
        s = c + tl.arange(0, SPLITS_BLOCK)
        row = (b * NUM_HEADS + h) * num_splits + s
        lse = tl.load(part_lse_ptr + row, mask=s < num_splits, other=float("-inf"), cache_modifier=".cg")
        part = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :],
                       mask=(s < num_splits)[:, None] & (d < HEAD_DIM)[None, :], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split with a token yet: every weight is 0
        alpha = tl.exp2(m - m_safe)  # 0 on the first chunk (m = -inf): the single-tile sums, unchanged
        w = tl.exp2(lse - m_safe)
        total = total * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(part * w[:, None], 0)
        m = m_new
    o = acc / tl.where(total > 0, total, 1.0)  # seq_len 0: zeros
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _widen_kv(k, v, dtype: tl.constexpr, FP8_WIDEN: tl.constexpr):
    # K / V tiles [BLOCK_N, BLOCK_D] as loaded -> q's dtype: an FP8 cache widened (exact; fp8_widen: by PTX,
    # _widen_fp8), a float cache as it is
    if FP8_WIDEN >= 2:
        k = _widen_fp8(k)
    else:
        k = k.to(dtype)
    if FP8_WIDEN >= 1:
        v = _widen_fp8(v)
    else:
        v = v.to(dtype)
    return k, v


@triton.jit
def _softmax_update(q, k, v, nmask, m_i, l_i, acc, qk_scale):
    # one online-softmax step of the widening path over a K / V tile of q's dtype: q [GROUP_PAD, BLOCK_D], nmask
    # [BLOCK_N] (the tile's keys in this split), acc [GROUP_PAD, BLOCK_D] fp32; the running max in base-2 units
    s = tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale  # [GROUP_PAD, BLOCK_N]
    s = tl.where(nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    return m_new, l_i * alpha + tl.sum(p, 1), acc
