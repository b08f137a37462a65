"""The attention prologue's per-head math as tile pieces another kernel can inline: kernels/attention/decode.py's
fused variant (kernels/attention/decode_fused.py) builds its q heads and the new token's k / v from the raw QKV row
with these.

The numerics are kernels/attention/qkv_prologue.py's, operation for operation: the RMS statistic summed in fp64
(_sum_squares: exact for 16-bit activations, so independent of the tiles' layouts), rounding to the activation
dtype after the norm and after its weight, RoPE as x1 cos - x2 sin / x2 cos + x1 sin by explicit FMAs in fp32
(_rotate), rounded once. Only the layout differs: the rows come out whole, [rows, BLOCK_D] (channel d at column d), as
a dot operand wants them, where the prologue keeps the two rotary halves in separate tiles (each column here computes
both halves' formulas on its pair, j = d mod HALF, and keeps its own).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.fp8 import FP8_MAX

_FP8_MAX = tl.constexpr(FP8_MAX)  # e4m3's largest finite value: FP8 stores saturate there (it has no inf)


@triton.jit
def _sum_squares(x):
    # [R, C] fp32 -> [R] fp64 sums of squares. A 16-bit value's square is exact in fp64 and so are the partial sums
    # (while a row's magnitudes span less than ~2^15), so the sum does not depend on the order a tile's layout gives
    # the reduction (sm90: the prologue sums [4, 64] tiles over 16 lanes x 4 values, the fused decode [16, 64] over
    # 8 x 8 and its k row over 4 warps): rounded to fp32 once, the same statistic in every kernel
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
def _prologue_rows(row_ptr, heads, rmask, w_ptr, cs_row, eps, HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, BLOCK_D: tl.constexpr, QK_NORM: tl.constexpr):
    # heads [R] (rmask [R, 1]): which heads of one token's QKV row (row_ptr, the activation dtype) -> those heads
    # normed (QK_NORM, weight w_ptr [HEAD_DIM]) and rotated by the token's cos / sin row cs_row (fp32, cos then sin),
    # [R, BLOCK_D] in the activation dtype, zeros past HEAD_DIM and in masked rows
    act = row_ptr.dtype.element_ty
    src = row_ptr + heads[:, None] * HEAD_DIM  # [R, 1]
    if QK_NORM:  # the statistic exactly as the prologue sums it (its tiles, its order)
        jh = tl.arange(0, BLOCK_HALF)[None, :]
        jmask = rmask & (jh < HALF)
        x1 = tl.load(src + jh, mask=jmask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + jh, mask=jmask, other=0.0).to(tl.float32)
        ss = _sum_squares(x1) + _sum_squares(x2)
        if BLOCK_REST > 0:
            rh = 2 * HALF + tl.arange(0, BLOCK_REST)[None, :]
            xr = tl.load(src + rh, mask=rmask & (rh < HEAD_DIM), other=0.0).to(tl.float32)
            ss += _sum_squares(xr)
        inv = tl.rsqrt(ss.to(tl.float32) / HEAD_DIM + eps)[:, None]  # [R, 1]
    d = tl.arange(0, BLOCK_D)[None, :]
    first = d < HALF
    rot = d < 2 * HALF
    rest = (d >= 2 * HALF) & (d < HEAD_DIM)  # partial rotary: normed, not rotated
    j = tl.where(first, d, d - HALF)  # the column's rotary pair (j, HALF + j); past 2 HALF masked
    a1 = tl.load(src + j, mask=rmask & rot, other=0.0).to(tl.float32)
    a2 = tl.load(src + HALF + j, mask=rmask & rot, other=0.0).to(tl.float32)
    ar = tl.load(src + d, mask=rmask & rest, other=0.0).to(tl.float32)
    if QK_NORM:
        w1 = tl.load(w_ptr + j, mask=rot, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + j, mask=rot, other=0.0).to(tl.float32)
        wr = tl.load(w_ptr + d, mask=rest, other=0.0).to(tl.float32)
        a1 = ((a1 * inv).to(act).to(tl.float32) * w1).to(act).to(tl.float32)
        a2 = ((a2 * inv).to(act).to(tl.float32) * w2).to(act).to(tl.float32)
        ar = ((ar * inv).to(act).to(tl.float32) * wr).to(act).to(tl.float32)
    cos = tl.load(cs_row + j, mask=rot, other=0.0)  # [1, BLOCK_D]
    sin = tl.load(cs_row + HALF + j, mask=rot, other=0.0)
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
def _decode_prologue(row_ptr, pos_ptr, cs_ptr, qw_ptr, kw_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, b, kvh, split,
                     seq_len, num_splits, heads, hmask, d, eps, inv_k_scale, inv_v_scale, stride_cos, stride_cb,
                     stride_cs, stride_ch, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                     HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, QK_NORM: tl.constexpr,
                     FP8_KV: tl.constexpr):
    # one decode program's share of the prologue, from its token's QKV row (row_ptr): its GROUP q heads (heads
    # [GROUP_PAD], hmask) normed and rotated, [GROUP_PAD, BLOCK_D] in the activation dtype; its KV head's k (normed,
    # rotated) and v for the new token, [1, BLOCK_D] each in the cache's dtype, stored into the cache by the split
    # whose share holds the new token (position seq_len - 1; the decode kernel's split rule), unless the slot is -1
    # (padding)
    cs_row = cs_ptr + tl.load(pos_ptr + b).to(tl.int64) * stride_cos
    q = _prologue_rows(row_ptr, heads, hmask[:, None], qw_ptr, cs_row, eps, HALF, HEAD_DIM, BLOCK_HALF, BLOCK_REST,
                       BLOCK_D, QK_NORM)
    one = tl.arange(0, 1)
    k = _prologue_rows(row_ptr, NUM_HEADS + kvh + one, one[:, None] >= 0, kw_ptr, cs_row, eps, HALF, HEAD_DIM,
                       BLOCK_HALF, BLOCK_REST, BLOCK_D, QK_NORM)
    dmask = d[None, :] < HEAD_DIM  # [1, BLOCK_D]
    v = tl.load(row_ptr + (NUM_HEADS + NUM_KV_HEADS + kvh) * HEAD_DIM + d[None, :], mask=dmask, other=0.0)
    cache_ty = k_cache_ptr.dtype.element_ty
    k = _to_cache(k, inv_k_scale, FP8_KV, cache_ty)
    v = _to_cache(v, inv_v_scale, FP8_KV, cache_ty)
    chunk = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits) * BLOCK_N
    slot = tl.load(slot_ptr + b).to(tl.int64)
    owner = (seq_len > 0) & (split == (seq_len - 1) // tl.maximum(chunk, 1)) & (slot >= 0)
    slot = tl.maximum(slot, 0)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kvh * stride_ch + d[None, :]
    tl.store(k_cache_ptr + dst, k, mask=dmask & owner)
    tl.store(v_cache_ptr + dst, v, mask=dmask & owner)
    return q, k, v
