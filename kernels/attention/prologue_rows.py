"""The attention prologue's per-head math as tile pieces another kernel can inline: kernels/attention/decode.py's
fused variant (kernels/attention/decode_fused.py) builds its q heads and the new token's k / v from the raw QKV row
with these.

The numerics are kernels/attention/qkv_prologue.py's, operation for operation: the RMS statistic as (first rotary
half + second half) + the rest, each sum of squares in fp64 (_sum_squares: exact for 16-bit activations, so the
tiles' shapes and layouts do not matter), rounding to the activation dtype after the norm and after its weight, RoPE
as x1 cos - x2 sin / x2 cos + x1 sin by explicit FMAs in fp32 (_rotate), rounded once. Only the layout differs: the
rows come out whole, [rows, BLOCK_D] (channel d at column d), as a dot operand wants them, where the prologue keeps
the two rotary halves in separate tiles (each column here computes both halves' formulas on its pair, j = d mod HALF,
and keeps its own).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.fp8 import FP8_MAX

_FP8_MAX = tl.constexpr(FP8_MAX)  # e4m3's largest finite value: FP8 stores saturate there (it has no inf)


@triton.jit
def _sum_squares(x):
    # [R, C] fp32 -> [R] fp64 sums of squares. A 16-bit value's square is exact in fp64 and so are the partial sums
    # (while a row's magnitudes span less than ~2^15), so the sum depends neither on the order a tile's layout gives
    # the reduction nor on zero padding (sm90: the prologue sums [4, 64] half-head tiles over 16 lanes x 4 values; the
    # fused decode whole-head [16, 128] and [1, 128] tiles, the other half zeroed, over other lanes and warps): rounded
    # to fp32 once, the same statistic in every kernel
    xd = x.to(tl.float64)
    return tl.sum(xd * xd, 1)


@triton.jit
def _rotate(x1, x2, cos, sin):
    # RoPE on a rotary pair in fp32: (x1 cos - x2 sin, x2 cos + x1 sin), each as one explicit FMA over a rounded
    # product. Left to the compiler, the sm90 build contracts each element by its own operands' use counts (seen in the
    # prologue's PTX: 3 of 4 values fma(x1, cos, -x2 sin), 1 fma(-x2, sin, x1 cos)), which differ between tile
    # layouts: 1-ulp differences between kernels. (The interpreter's fma rounds twice, in both kernels alike.)
    return tl.fma(x1, cos, -(x2 * sin)), tl.fma(x2, cos, x1 * sin)


@triton.jit
def _columns(HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # a head's columns [1, BLOCK_D]: d, which are in the rotary part's first half / in the rotary part / past it
    # (partial rotary: normed, not rotated), and each rotary column's pair index j (channels j and HALF + j)
    d = tl.arange(0, BLOCK_D)[None, :]
    first = d < HALF
    rot = d < 2 * HALF
    return d, first, rot, (d >= 2 * HALF) & (d < HEAD_DIM), tl.where(first, d, d - HALF)


@triton.jit
def _load_heads(row_ptr, heads, rmask, HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # heads [R] (rmask [R, 1]) of one token's QKV row (row_ptr) -> fp32 [R, BLOCK_D] each: a1 / a2 channel j / HALF + j
    # of each rotary column's pair, ar the column's own channel past the rotary part (zeros elsewhere)
    d, first, rot, rest, j = _columns(HALF, HEAD_DIM, BLOCK_D)
    src = row_ptr + heads[:, None] * HEAD_DIM  # [R, 1]
    a1 = tl.load(src + j, mask=rmask & rot, other=0.0).to(tl.float32)
    a2 = tl.load(src + HALF + j, mask=rmask & rot, other=0.0).to(tl.float32)
    ar = tl.load(src + d, mask=rmask & rest, other=0.0).to(tl.float32)
    return a1, a2, ar


@triton.jit
def _load_weight(w_ptr, HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # a norm weight [HEAD_DIM] laid out as _load_heads lays out a head: (w1, w2, wr) fp32 [1, BLOCK_D]
    d, first, rot, rest, j = _columns(HALF, HEAD_DIM, BLOCK_D)
    w1 = tl.load(w_ptr + j, mask=rot, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + j, mask=rot, other=0.0).to(tl.float32)
    return w1, w2, tl.load(w_ptr + d, mask=rest, other=0.0).to(tl.float32)


@triton.jit
def _norm_rope(a1, a2, ar, w1, w2, wr, cos, sin, eps, act: tl.constexpr, HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, QK_NORM: tl.constexpr):
    # _load_heads' tiles -> those heads normed (QK_NORM, the weight from _load_weight) and rotated (cos / sin
    # [1, BLOCK_D] at each column's pair), [R, BLOCK_D] in the activation dtype act, zeros past HEAD_DIM and in masked
    # rows
    d, first, rot, rest, j = _columns(HALF, HEAD_DIM, BLOCK_D)
    if QK_NORM:  # the prologue's statistic: (first half + second half) + rest, each sum exact in fp64
        ss = _sum_squares(tl.where(first, a1, 0.0)) + _sum_squares(tl.where(first, a2, 0.0))
        if 2 * HALF < HEAD_DIM:
            ss += _sum_squares(ar)
        inv = tl.rsqrt(ss.to(tl.float32) / HEAD_DIM + eps)[:, None]  # [R, 1]
        a1 = ((a1 * inv).to(act).to(tl.float32) * w1).to(act).to(tl.float32)
        a2 = ((a2 * inv).to(act).to(tl.float32) * w2).to(act).to(tl.float32)
        ar = ((ar * inv).to(act).to(tl.float32) * wr).to(act).to(tl.float32)
    o1, o2 = _rotate(a1, a2, cos, sin)  # channel j of the first half, channel HALF + j
    return tl.where(first, o1, tl.where(rot, o2, ar)).to(act)


@triton.jit
def _to_cache(x, inv_scale, FP8_KV: tl.constexpr, cache_ty: tl.constexpr):
    # an activation-dtype tile -> the cache's dtype as the prologue stores it: FP8 x * (1 / scale) saturated, else a
    # plain cast
    if FP8_KV:
        x = tl.clamp(x.to(tl.float32) * inv_scale, -_FP8_MAX, _FP8_MAX)
    return x.to(cache_ty)


@triton.jit
def _decode_prologue(row_ptr, pos_ptr, cs_ptr, qw_ptr, kw_ptr, b, kvh, heads, hmask, d, eps, inv_k_scale, inv_v_scale,
                     stride_cos, cache_ty: tl.constexpr, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                     HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr, QK_NORM: tl.constexpr,
                     FP8_KV: tl.constexpr):
    # one decode program's share of the prologue, from its token's QKV row (row_ptr): its GROUP q heads (heads
    # [GROUP_PAD], hmask) normed and rotated, [GROUP_PAD, BLOCK_D] in the activation dtype; its KV head's k (normed,
    # rotated) and v for the new token, [1, BLOCK_D] each in the cache's dtype (cache_ty), as the prologue stores them
    # every load of the row first (one memory latency), then the math
    pos = tl.load(pos_ptr + b).to(tl.int64)
    qa1, qa2, qar = _load_heads(row_ptr, heads, hmask[:, None], HALF, HEAD_DIM, BLOCK_D)
    one = tl.arange(0, 1)
    ka1, ka2, kar = _load_heads(row_ptr, NUM_HEADS + kvh + one, one[:, None] >= 0, HALF, HEAD_DIM, BLOCK_D)
    v = tl.load(row_ptr + (NUM_HEADS + NUM_KV_HEADS + kvh) * HEAD_DIM + d[None, :], mask=d[None, :] < HEAD_DIM,
                other=0.0)
    _, _, rot, _, j = _columns(HALF, HEAD_DIM, BLOCK_D)
    cos = tl.load(cs_ptr + pos * stride_cos + j, mask=rot, other=0.0)  # [1, BLOCK_D] fp32
    sin = tl.load(cs_ptr + pos * stride_cos + HALF + j, mask=rot, other=0.0)
    qw1, qw2, qwr = cos, cos, cos  # unused without the norm
    kw1, kw2, kwr = cos, cos, cos
    if QK_NORM:
        qw1, qw2, qwr = _load_weight(qw_ptr, HALF, HEAD_DIM, BLOCK_D)
        kw1, kw2, kwr = _load_weight(kw_ptr, HALF, HEAD_DIM, BLOCK_D)
    act = row_ptr.dtype.element_ty
    q = _norm_rope(qa1, qa2, qar, qw1, qw2, qwr, cos, sin, eps, act, HALF, HEAD_DIM, BLOCK_D, QK_NORM)
    k = _norm_rope(ka1, ka2, kar, kw1, kw2, kwr, cos, sin, eps, act, HALF, HEAD_DIM, BLOCK_D, QK_NORM)
    return q, _to_cache(k, inv_k_scale, FP8_KV, cache_ty), _to_cache(v, inv_v_scale, FP8_KV, cache_ty)


@triton.jit
def _store_new_kv(k_cache_ptr, v_cache_ptr, slot_ptr, b, kvh, owns, k, v, d, stride_cb, stride_cs, stride_ch,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    # the new token's k / v [1, BLOCK_D] into its cache slot, by the program whose split owns it (owns), unless the
    # slot is -1 (padding)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    mask = (d[None, :] < HEAD_DIM) & owns & (slot >= 0)
    slot = tl.maximum(slot, 0)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kvh * stride_ch + d[None, :]
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)
