"""Tile-level pieces of the paged attention kernels (kernels/attention.py, kernels/decode_attention.py): cache
row offsets from page ids, the FP8 V word reader, the online-softmax step, and the prefill's software-pipelined
loop over the unmasked key tiles (PIPE_QK). Each works on one program's tiles; shapes in the comments."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fp8_words_f16(ptr, rows, nmask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ASM: tl.constexpr):
    # an FP8 (e4m3) [BLOCK_N, BLOCK_D] tile (row starts `rows` [BLOCK_N], in elements, multiples of 4) read as 32-bit
    # words and widened to fp16 (exact). Loaded as FP8, a V tile goes into the PV dot's operand layout byte by byte:
    # its reduction dim (keys) is the strided one, and Triton moves that layout change above the widening (sm90
    # SASS: 128 LDS.U8 + byte shuffles per thread per 128-key tile, what kept FP8 decode at bf16's speed). Built from
    # words by join + reshape, the layout change happens after the widening, on 16-bit values (ldmatrix.trans).
    w = tl.arange(0, BLOCK_D // 4)
    x = tl.load(ptr.to(tl.pointer_type(tl.int32)) + (rows // 4)[:, None] + w[None, :],
                mask=nmask[:, None] & (w < HEAD_DIM // 4)[None, :], other=0)  # [BLOCK_N, BLOCK_D // 4]
    if ASM:  # two packed cvts per word, no byte shuffles (GPU only: the interpreter runs no PTX)
        b0, b1, b2, b3 = tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; .reg .b32 a, b; mov.b32 {lo, hi}, $4; cvt.rn.f16x2.e4m3x2 a, lo; "
            "cvt.rn.f16x2.e4m3x2 b, hi; mov.b32 {$0, $1}, a; mov.b32 {$2, $3}, b; }",
            "=h,=h,=h,=h,r", [x], dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        b0 = (x & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        b1 = ((x >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        b2 = ((x >> 16) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        b3 = ((x >> 24) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    # join(join(b0, b2), join(b1, b3)): [.., word, 2, 2] with byte index 2 * inner + outer -> b0 b1 b2 b3
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), [rows.shape[0], BLOCK_D])


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
def _qk_tile(q, k_cache_ptr, rows, n0, kv_end, d, dmask, BLOCK_N: tl.constexpr):
    # [BLOCK_M, BLOCK_N] scores (not yet scaled) of keys [n0, n0 + BLOCK_N) whose cache rows start at `rows`; an FP8
    # cache is widened to q's dtype (fp16) right after the load (exact), its scale is in qk_scale
    n = n0 + tl.arange(0, BLOCK_N)
    kv_mask = (n < kv_end)[:, None] & dmask[None, :]
    k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
    return tl.dot(q, tl.trans(k)).to(tl.float32)


@triton.jit
def _softmax_step(s, n0, kv_end, q_pos, m_i, l_i, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    # the online-softmax update for the scores s [BLOCK_M, BLOCK_N] of keys [n0, n0 + BLOCK_N): p (fp32), the new
    # running max and sum, and alpha, the factor the accumulator takes before p @ V is added
    if MASKED:
        n = n0 + tl.arange(0, BLOCK_N)
        s = tl.where((n < kv_end)[None, :] & (n[None, :] <= q_pos[:, None]), s, float("-inf"))
    # the running max is in scaled (base-2) units; scaling inside the exponent makes one FFMA per score
    # (qk_scale > 0: the max commutes with it)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past q_len may see no key yet
    p = tl.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, m_new, l_i * alpha + tl.sum(p, 1), alpha


@triton.jit
def _v_tile(q, v_cache_ptr, rows, n0, kv_end, d, dmask, BLOCK_N: tl.constexpr):
    n = n0 + tl.arange(0, BLOCK_N)
    v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=(n < kv_end)[:, None] & dmask[None, :], other=0.0)
    return v.to(q.dtype)  # [BLOCK_N, BLOCK_D]


@triton.jit
def _softmax_pv(s, q, v_cache_ptr, rows, n0, kv_end, q_pos, d, dmask, m_i, l_i, acc, qk_scale, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr):
    # one online-softmax step over the scores s of keys [n0, n0 + BLOCK_N); acc [BLOCK_M, BLOCK_D]
    v = _v_tile(q, v_cache_ptr, rows, n0, kv_end, d, dmask, BLOCK_N)
    p, m_i, l_i, alpha = _softmax_step(s, n0, kv_end, q_pos, m_i, l_i, qk_scale, BLOCK_N, MASKED)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    return m_i, l_i, acc


@triton.jit
def _prefill_tile(q, k_cache_ptr, v_cache_ptr, rows, n0, kv_end, q_pos, d, dmask, m_i, l_i, acc, qk_scale,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    s = _qk_tile(q, k_cache_ptr, rows, n0, kv_end, d, dmask, BLOCK_N)
    return _softmax_pv(s, q, v_cache_ptr, rows, n0, kv_end, q_pos, d, dmask, m_i, l_i, acc, qk_scale, BLOCK_N, MASKED)


@triton.jit
def _pipelined_step(q, p, s, k_cache_ptr, v_cache_ptr, bt, page_v, page_next, n0, kv_end, q_pos, d, dmask, offs, kvh,
                    m_i, l_i, acc, qk_scale, stride_cb, stride_cs, stride_ch, BLOCK_SIZE: tl.constexpr,
                    BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr, OFF64: tl.constexpr):
    # the step of tile t = n0 / BLOCK_N: p_{t-1} @ V_{t-1}, then tile t+1's QK^T, then tile t's softmax (s = its
    # scores); page_v: tile t-1's page ids, page_next: tile t+1's
    rows_v = _kv_rows(page_v, n0 - BLOCK_N, offs, kvh, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, ALIGNED, OFF64)
    v = _v_tile(q, v_cache_ptr, rows_v, n0 - BLOCK_N, kv_end, d, dmask, BLOCK_N)
    acc = tl.dot(p.to(v.dtype), v, acc)  # acc was rescaled for it
    page_v = tl.load(bt + (n0 + offs) // BLOCK_SIZE, mask=n0 + offs < kv_end, other=0)
    rows = _kv_rows(page_next, n0 + BLOCK_N, offs, kvh, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, ALIGNED, OFF64)
    nxt = n0 + 2 * BLOCK_N + offs
    page_next = tl.load(bt + nxt // BLOCK_SIZE, mask=nxt < kv_end, other=0)
    s_next = _qk_tile(q, k_cache_ptr, rows, n0 + BLOCK_N, kv_end, d, dmask, BLOCK_N)
    p, m_i, l_i, alpha = _softmax_step(s, n0, kv_end, q_pos, m_i, l_i, qk_scale, BLOCK_N, False)
    acc = acc * alpha[:, None]
    return p, s_next, page_v, page_next, m_i, l_i, acc


@triton.jit
def _pipelined_tiles(q, k_cache_ptr, v_cache_ptr, bt, page_next, full_end, kv_end, q_pos, d, dmask, offs, kvh, m_i,
                     l_i, acc, qk_scale, stride_cb, stride_cs, stride_ch, BLOCK_SIZE: tl.constexpr,
                     BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr, OFF64: tl.constexpr):
    # tiles [0, pipe_end), pipe_end = max(full_end, BLOCK_N), tile 0 masked (a no-op when it is all visible), given
    # page_next = tile 0's page ids. Returns the state after them, tile pipe_end's scores and cache rows, and the
    # page ids of the tile after that. The step of tile t issues p_{t-1} @ V_{t-1}, then tile t+1's QK^T, then tile
    # t's softmax: Triton's wgmma pipeliner leaves a dot in flight only when every use of its previous result comes
    # after a full wait in the loop; the PV dot (rescaled in the same step) provides that wait, so the QK^T after
    # it runs on the tensor cores through the softmax (sm90 TTGIR). No scf.if around the loop: Triton pipelines
    # no K/V loads of a loop nested in one.
    rows = _kv_rows(page_next, 0, offs, kvh, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, ALIGNED, OFF64)
    page_v = page_next  # V's page ids one step behind K's; carried as loaded values, not as a copy of an iter arg
    page_next = tl.load(bt + (BLOCK_N + offs) // BLOCK_SIZE, mask=BLOCK_N + offs < kv_end, other=0)
    s = _qk_tile(q, k_cache_ptr, rows, 0, kv_end, d, dmask, BLOCK_N)
    p, m_i, l_i, alpha = _softmax_step(s, 0, kv_end, q_pos, m_i, l_i, qk_scale, BLOCK_N, True)
    acc = acc * alpha[:, None]
    rows = _kv_rows(page_next, BLOCK_N, offs, kvh, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, ALIGNED, OFF64)
    page_next = tl.load(bt + (2 * BLOCK_N + offs) // BLOCK_SIZE, mask=2 * BLOCK_N + offs < kv_end, other=0)
    s = _qk_tile(q, k_cache_ptr, rows, BLOCK_N, kv_end, d, dmask, BLOCK_N)
    # (a yield of an iter arg itself, e.g. rows_prev = rows, makes Triton skip pipelining the loop: distance > 1)
    pipe_end = tl.maximum(full_end, BLOCK_N)
    # two tiles a step (t, t + 1): the second QK^T, in flight across the back edge, gets the registers of the scores
    # just exponentiated; one a step would copy the in-flight scores at the back edge, and ptxas then serializes
    # every wgmma (C7514)
    for n0 in range(BLOCK_N, pipe_end - BLOCK_N, 2 * BLOCK_N):
        p, s, page_v, page_next, m_i, l_i, acc = _pipelined_step(
            q, p, s, k_cache_ptr, v_cache_ptr, bt, page_v, page_next, n0, kv_end, q_pos, d, dmask, offs, kvh, m_i,
            l_i, acc, qk_scale, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, BLOCK_N, ALIGNED, OFF64)
        p, s, page_v, page_next, m_i, l_i, acc = _pipelined_step(
            q, p, s, k_cache_ptr, v_cache_ptr, bt, page_v, page_next, n0 + BLOCK_N, kv_end, q_pos, d, dmask, offs,
            kvh, m_i, l_i, acc, qk_scale, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, BLOCK_N, ALIGNED, OFF64)
    if (pipe_end // BLOCK_N) % 2 == 0:  # tiles 1 .. T-1 are odd in number: one step left (no loop back edge)
        p, s, page_v, page_next, m_i, l_i, acc = _pipelined_step(
            q, p, s, k_cache_ptr, v_cache_ptr, bt, page_v, page_next, pipe_end - BLOCK_N, kv_end, q_pos, d, dmask,
            offs, kvh, m_i, l_i, acc, qk_scale, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, BLOCK_N, ALIGNED, OFF64)
    rows_v = _kv_rows(page_v, pipe_end - BLOCK_N, offs, kvh, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, ALIGNED,
                      OFF64)
    v = _v_tile(q, v_cache_ptr, rows_v, pipe_end - BLOCK_N, kv_end, d, dmask, BLOCK_N)
    acc = tl.dot(p.to(v.dtype), v, acc)
    # the cache rows of tile pipe_end (its page ids again: one small load, no value carried out of the loop)
    rows = _kv_rows(tl.load(bt + (pipe_end + offs) // BLOCK_SIZE, mask=pipe_end + offs < kv_end, other=0), pipe_end,
                    offs, kvh, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, ALIGNED, OFF64)
    return m_i, l_i, acc, s, rows, page_next
