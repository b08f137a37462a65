"""The fused router's packed softmax top-k (kernels/router_fused.py TAIL_CONFIGS "packed"): one integer max per pick
over keys that order (logit, -expert id) as kernels/router.py _pick_max does, instead of a float max then an index
min. The same ids in the same order and the same weights as kernels/router.py _softmax_top_k (tests compare the two
through route_fused's packed and unpacked tails)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _order_key(x, e, KEY16: tl.constexpr):
    # a distinct integer per column ordered as (x, -e): the max key is x's max at its lowest column, the pick rule
    # of kernels/router.py _pick_max. x fp32 [rows, cols] (-0.0 ranks as +0.0, as == does), e int32 column ids.
    # KEY16 (x holds bf16 values: its low 16 bits are zero): int32 keys, value bits << 16 | 0xFFFF - e; else int64
    # every NaN as one positive NaN: above +inf whatever its sign or payload, ties by column (router.py _pick_max)
    b = tl.where(x != x, 0x7FC00000, tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True))
    if KEY16:
        b = b >> 16
        return (tl.where(b < 0, b ^ 0x7FFF, b) << 16) | (0xFFFF - e)
    else:
        b = tl.where(b < 0, b ^ 0x7FFFFFFF, b)  # sign-magnitude -> two's complement order
        return (b.to(tl.int64) << 32) | (0x7FFFFFFF - e).to(tl.int64)


@triton.jit
def _key_value(key, KEY16: tl.constexpr):
    # (x, e) back from _order_key's keys
    if KEY16:
        b = key >> 16
        return (tl.where(b < 0, b ^ 0x7FFF, b) << 16).to(tl.float32, bitcast=True), 0xFFFF - (key & 0xFFFF)
    else:
        b = (key >> 32).to(tl.int32)
        return (tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.float32, bitcast=True),
                0x7FFFFFFF - (key & 0x7FFFFFFF).to(tl.int32))


@triton.jit
def _softmax_top_k_packed(x, e, k, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, TAIL_T: tl.constexpr,
                          BLOCK_K: tl.constexpr, KEY16: tl.constexpr, GROUP: tl.constexpr):
    # kernels/router.py _softmax_top_k's result (the same ids in the same order, the same weights) with one integer
    # max per pick instead of a float max and an index min, and the picks in two levels: the TOP_K best of each
    # GROUP columns (a reduction inside one warp, no shared memory or barrier), then the TOP_K best of those
    # BLOCK_E / GROUP x BLOCK_K candidates (32 at 128 experts, top-8). x [TAIL_T, BLOCK_E] fp32 logits, -inf past
    # the last expert. RENORMALIZE: the picks' exps added one by one in pick order as _softmax_top_k does (a sum
    # over the [TAIL_T, BLOCK_K] tile would run in its layout's order, another at another warp count: other bits)
    BLOCK_E: tl.constexpr = x.shape[1]
    NG: tl.constexpr = BLOCK_E // GROUP
    LOCAL: tl.constexpr = TOP_K if TOP_K < GROUP else GROUP  # a group gives at most all of its columns
    keys = tl.reshape(_order_key(x, e, KEY16), [TAIL_T, NG, GROUP])
    lowest = tl.full([1], -(2**31), tl.int32) if KEY16 else tl.full([1], -(2**63), tl.int64)
    kc = tl.arange(0, BLOCK_K)[None, None, :]
    cand = tl.zeros([TAIL_T, NG, BLOCK_K], keys.dtype) + lowest[:, None, None]
    first = tl.zeros([TAIL_T, 1, 1], tl.float32)  # NG == 1: the first pick's value (max(x)) and the exps' sum
    psum = tl.zeros([TAIL_T, 1, 1], tl.float32)
    for i in tl.static_range(LOCAL):
        m = tl.max(keys, 2, keep_dims=True)  # [TAIL_T, NG, 1]
        cand = tl.where(kc == i, m, cand)
        keys = tl.where(keys == m, lowest[:, None, None], keys)
        if NG == 1 and RENORMALIZE:
            v = _key_value(m, KEY16)[0]
            if i == 0:
                first = v
            psum += tl.exp(v - first)
    cand = tl.reshape(cand, [TAIL_T, NG * BLOCK_K])
    if NG == 1:  # one group: its picks are the answer
        top = cand
        denom = tl.reshape(psum, [TAIL_T])
    else:
        # a gather into an arange's layout, i.e. one shared-memory exchange after which every warp holds every
        # candidate: the picks among them reduce inside each warp (the reshape alone left them across warps)
        cand = tl.gather(cand, tl.zeros([TAIL_T, NG * BLOCK_K], tl.int32) + tl.arange(0, NG * BLOCK_K)[None, :], 1)
        top = tl.zeros([TAIL_T, BLOCK_K], keys.dtype) + lowest[:, None]
        first2 = tl.zeros([TAIL_T, 1], tl.float32)
        psum2 = tl.zeros([TAIL_T, 1], tl.float32)
        for i in tl.static_range(TOP_K):
            m = tl.max(cand, 1, keep_dims=True)  # [TAIL_T, 1]
            top = tl.where(k == i, m, top)
            cand = tl.where(cand == m, lowest[:, None], cand)
            if RENORMALIZE:
                v = _key_value(m, KEY16)[0]
                if i == 0:
                    first2 = v
                psum2 += tl.exp(v - first2)
        denom = tl.reshape(psum2, [TAIL_T])
    vals, top_ids = _key_value(top, KEY16)
    row_max = tl.max(tl.where(k == 0, vals, float("-inf")), 1)  # the first pick: max(x)
    top_vals = tl.where(k < TOP_K, tl.exp(vals - row_max[:, None]), 0.0)
    if not RENORMALIZE:
        denom = tl.sum(tl.exp(x - row_max[:, None]), 1)
    return top_vals / denom[:, None], top_ids
