"""The attention prologue in one launch: from the QKV projection's output, per-head q/k RMSNorm (optional),
RoPE on q and k (neox layout, partial rotary), q written out, k and v stored into the paged KV cache.

Replaces q_norm + k_norm + apply_rope + store_kv (and the copies that reshaping strided q/k views costs):
the numerics are those of the four separate kernels, rounding to the activation dtype where they do (after
the norm, after its weight, after RoPE), and FP8 KV stores x * (1 / scale) saturated to e4m3's range, as
kernels/attention/prefill.py store_kv does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention.prefill import store_kv_ref
from kernels.attention.prologue_rows import _rotate, _sum_squares
from kernels.fp8 import FP8_DTYPE, FP8_MAX
from kernels.norm import rms_norm_ref
from kernels.pdl import launch_kwargs, pdl_enabled, pdl_release, pdl_wait
from kernels.rope import apply_rope_ref


def _split_heads(qkv: torch.Tensor, k_cache: torch.Tensor) -> tuple[int, int, int]:
    # (num_heads, num_kv_heads, head_dim) of qkv [T, (num_heads + 2 num_kv_heads) * head_dim], from the cache
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    width = qkv.shape[1] if qkv.dim() == 2 else -1
    num_heads = width // head_dim - 2 * num_kv_heads if width % head_dim == 0 else 0
    if num_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"qkv {tuple(qkv.shape)} is not [tokens, (heads + 2 * {num_kv_heads}) * {head_dim}] with "
                         f"heads a multiple of the cache's {num_kv_heads} kv heads")
    return num_heads, num_kv_heads, head_dim


def check_prologue(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                   q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of the prologue's inputs, or a ValueError saying what does not fit."""
    num_heads, num_kv_heads, head_dim = _split_heads(qkv, k_cache)
    num_tokens = qkv.shape[0]
    rotary_dim = cos_sin.shape[1]
    if qkv.stride(1) != 1 or positions.shape != (num_tokens,) or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"qkv_prologue needs qkv with contiguous rows and positions / slot_mapping "
                         f"[{num_tokens}], got {tuple(positions.shape)} / {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64, got {slot_mapping.dtype}")
    if rotary_dim % 2 or rotary_dim > head_dim or cos_sin.stride(1) != 1 or cos_sin.dtype != torch.float32:
        raise ValueError(f"cos_sin must be fp32 [positions, rotary_dim <= {head_dim}, even], "
                         f"got {cos_sin.dtype} {tuple(cos_sin.shape)}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight go together")
    for w in (q_norm_weight, k_norm_weight):
        if w is not None and (w.shape != (head_dim,) or not w.is_contiguous()):
            raise ValueError(f"q/k norm weights must be contiguous [{head_dim}], got {tuple(w.shape)}")
    if v_cache.shape != k_cache.shape or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError(f"k/v cache must match with a contiguous head_dim, got {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)}")
    if k_cache.dtype not in (qkv.dtype, FP8_DTYPE) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"dtype mismatch: qkv {qkv.dtype}, kv cache {k_cache.dtype} (the cache holds qkv's dtype or "
                         f"{FP8_DTYPE})")
    return num_heads, num_kv_heads, head_dim


def qkv_prologue_ref(
    qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]: q heads, k heads, v heads
    positions: torch.Tensor,  # [num_tokens]
    cos_sin: torch.Tensor,  # [max_positions, rotary_dim] fp32, cos then sin (kernels/rope.py)
    q_norm_weight: torch.Tensor | None,  # [head_dim]; None (with k_norm_weight None): no q/k norm
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = padding: store nothing
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Returns q [num_tokens, num_heads, head_dim] (normed, rotated); k and v go into the cache."""
    num_heads, num_kv_heads, head_dim = _split_heads(qkv, k_cache)
    num_tokens = qkv.shape[0]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.reshape(num_tokens, num_heads, head_dim)
    k = k.reshape(num_tokens, num_kv_heads, head_dim)
    v = v.reshape(num_tokens, num_kv_heads, head_dim)
    if q_norm_weight is not None and k_norm_weight is not None:
        q = rms_norm_ref(q.reshape(-1, head_dim), q_norm_weight, eps).view_as(q)
        k = rms_norm_ref(k.reshape(-1, head_dim), k_norm_weight, eps).view_as(k)
    q, k = apply_rope_ref(positions, q, k, cos_sin)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q


@triton.jit
def _norm_weight(qw_ptr, kw_ptr, is_q, cols, mask):
    # the q or the k norm weight of each head of the tile at channels cols [1, C]: [BLOCK_H, C]
    return tl.where(is_q, tl.load(qw_ptr + cols, mask=mask, other=0.0), tl.load(kw_ptr + cols, mask=mask, other=0.0))


@triton.jit(do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])  # per-token scalars: any slice, one variant
def _qkv_prologue_kernel(
    qkv_ptr, pos_ptr, cs_ptr, qw_ptr, kw_ptr, q_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    eps, inv_k_scale, inv_v_scale,
    stride_t, stride_qt, stride_qh, stride_cs,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, QK_NORM: tl.constexpr, FP8: tl.constexpr, FP8_MAX_C: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # program (t, b): heads [b * BLOCK_H, (b + 1) * BLOCK_H) of the q heads followed by the k heads (qkv's
    # column order); a k head also moves its v head. Tiles are [BLOCK_H, channels].
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    hmask = h < NUM_HEADS + NUM_KV_HEADS
    is_q = h < NUM_HEADS
    act = qkv_ptr.dtype.element_ty
    src = qkv_ptr + t * stride_t + h * HEAD_DIM
    j = tl.arange(0, BLOCK_HALF)[None, :]
    jmask = hmask & (j < HALF)
    # the q/k norm weights are no kernel's output: read first, with PDL while the predecessor drains
    # (kernels/pdl.py); qkv, positions and slots only after the wait. The same code with PDL off: the two variants
    # then differ by the two griddepcontrol instructions alone (measured: when only the PDL variant loaded them
    # early, the compiler rounded q differently, 1 ulp in ~3% of tokens, which tests/test_pdl.py's bit-for-bit
    # comparison of PDL on and off reads as a race)
    if QK_NORM:
        w1 = _norm_weight(qw_ptr, kw_ptr, is_q, j, j < HALF)
        w2 = _norm_weight(qw_ptr, kw_ptr, is_q, HALF + j, j < HALF)
        if BLOCK_REST > 0:
            rw = 2 * HALF + tl.arange(0, BLOCK_REST)[None, :]
            wr = _norm_weight(qw_ptr, kw_ptr, is_q, rw, rw < HEAD_DIM)
    pdl_wait(PDL)
    pdl_release(PDL)
    x1 = tl.load(src + j, mask=jmask, other=0.0).to(tl.float32)  # rotary channels [0, HALF)
    x2 = tl.load(src + HALF + j, mask=jmask, other=0.0).to(tl.float32)  # [HALF, 2 HALF)
    if BLOCK_REST > 0:  # partial rotary: channels [2 HALF, HEAD_DIM) are normed but not rotated
        r = 2 * HALF + tl.arange(0, BLOCK_REST)[None, :]
        rmask = hmask & (r < HEAD_DIM)
        xr = tl.load(src + r, mask=rmask, other=0.0).to(tl.float32)
    if QK_NORM:
        # summed in fp64 (exact for 16-bit values): the same bits as the decode kernel's fused prologue, whose tiles
        # have other layouts (kernels/attention/prologue_rows.py)
        ss = _sum_squares(x1) + _sum_squares(x2)
        if BLOCK_REST > 0:
            ss += _sum_squares(xr)
        inv = tl.rsqrt(ss.to(tl.float32) / HEAD_DIM + eps)[:, None]  # [BLOCK_H, 1]
        # rounded as rms_norm does: the normed value, then the product with the weight
        x1 = ((x1 * inv).to(act).to(tl.float32) * w1.to(tl.float32)).to(act).to(tl.float32)
        x2 = ((x2 * inv).to(act).to(tl.float32) * w2.to(tl.float32)).to(act).to(tl.float32)
        if BLOCK_REST > 0:
            xr = ((xr * inv).to(act).to(tl.float32) * wr.to(tl.float32)).to(act).to(tl.float32)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cs_ptr + pos * stride_cs + j, mask=j < HALF, other=0.0)  # [1, BLOCK_HALF]
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + j, mask=j < HALF, other=0.0)
    o1, o2 = _rotate(x1, x2, cos, sin)  # explicit FMAs: the fused decode's bits (prologue_rows.py)
    o1 = o1.to(act)
    o2 = o2.to(act)

    q_dst = q_ptr + t * stride_qt + h * stride_qh
    tl.store(q_dst + j, o1, mask=jmask & is_q)
    tl.store(q_dst + HALF + j, o2, mask=jmask & is_q)
    if BLOCK_REST > 0:
        tl.store(q_dst + r, xr.to(act), mask=rmask & is_q)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    kv = hmask & (h >= NUM_HEADS) & (slot >= 0)  # [BLOCK_H, 1]: k heads of a real token
    slot = tl.maximum(slot, 0)
    hk = tl.maximum(h - NUM_HEADS, 0)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    k_dst = k_cache_ptr + blk * stride_kcb + off * stride_kcs + hk * stride_kch
    cache_ty = k_cache_ptr.dtype.element_ty
    if FP8:  # from the activation-dtype k, as store_kv gets it; saturate: e4m3 has no inf
        o1 = tl.clamp(o1.to(tl.float32) * inv_k_scale, -FP8_MAX_C, FP8_MAX_C)
        o2 = tl.clamp(o2.to(tl.float32) * inv_k_scale, -FP8_MAX_C, FP8_MAX_C)
    tl.store(k_dst + j, o1.to(cache_ty), mask=jmask & kv)
    tl.store(k_dst + HALF + j, o2.to(cache_ty), mask=jmask & kv)
    if BLOCK_REST > 0:
        kr = xr.to(act)
        if FP8:
            kr = tl.clamp(kr.to(tl.float32) * inv_k_scale, -FP8_MAX_C, FP8_MAX_C)
        tl.store(k_dst + r, kr.to(cache_ty), mask=rmask & kv)

    d = tl.arange(0, BLOCK_D)[None, :]
    dmask = kv & (d < HEAD_DIM)
    v = tl.load(src + NUM_KV_HEADS * HEAD_DIM + d, mask=dmask, other=0.0)  # v head hk sits NUM_KV_HEADS on
    if FP8:
        v = tl.clamp(v.to(tl.float32) * inv_v_scale, -FP8_MAX_C, FP8_MAX_C)
    v_dst = v_cache_ptr + blk * stride_vcb + off * stride_vcs + hk * stride_vch + d
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=dmask)


def qkv_prologue(
    qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]: q heads, k heads, v heads
    positions: torch.Tensor,  # [num_tokens]
    cos_sin: torch.Tensor,  # [max_positions, rotary_dim] fp32, cos then sin (kernels/rope.py)
    q_norm_weight: torch.Tensor | None,  # [head_dim]; None (with k_norm_weight None): no q/k norm
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = padding: store nothing
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    num_heads, num_kv_heads, head_dim = check_prologue(qkv, positions, cos_sin, q_norm_weight, k_norm_weight, k_cache,
                                                       v_cache, slot_mapping)
    num_tokens = qkv.shape[0]
    rotary_dim = cos_sin.shape[1]
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    heads = num_heads + num_kv_heads
    # 4 heads a program: one decode token still spreads over several SMs (Qwen3-30B-A3B: 9 programs a token),
    # and one compiled variant serves every step size
    block_h = min(triton.next_power_of_2(heads), 4)
    half, rest = rotary_dim // 2, head_dim - rotary_dim
    qk_norm = q_norm_weight is not None
    qw = q_norm_weight if qk_norm else cos_sin  # unused pointers when there is no norm
    kw = k_norm_weight if qk_norm else cos_sin
    pdl = pdl_enabled(qkv.device)
    _qkv_prologue_kernel[(num_tokens, triton.cdiv(heads, block_h))](
        qkv, positions, cos_sin, qw, kw, q, k_cache, v_cache, slot_mapping,
        eps, 1.0 / k_scale, 1.0 / v_scale,
        qkv.stride(0), q.stride(0), q.stride(1), cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half, BLOCK_SIZE=k_cache.shape[1],
        QK_NORM=qk_norm, FP8=k_cache.dtype == FP8_DTYPE, FP8_MAX_C=FP8_MAX,
        BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(max(half, 1)),
        BLOCK_REST=triton.next_power_of_2(rest) if rest else 0, BLOCK_D=triton.next_power_of_2(head_dim),
        PDL=pdl, num_warps=4 if block_h * head_dim >= 1024 else 2,  # [4, 128] tiles: 2 warps, 8 values a thread
        **launch_kwargs(pdl),
    )
    return q
