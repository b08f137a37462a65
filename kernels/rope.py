"""Rotary position embedding (neox layout: rotate halves), with partial rotary support."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rope_cos_sin(rotary_dim: int, max_positions: int, base: float, device=None) -> torch.Tensor:
    """[max_positions, rotary_dim] fp32: cos in the first half, sin in the second."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope_ref(
    positions: torch.Tensor,  # [num_tokens]
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin: torch.Tensor,  # [max_positions, rotary_dim]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates the first rotary_dim channels of each head; the rest pass through."""
    rotary_dim = cos_sin.shape[1]
    cos, sin = cos_sin[positions.long()].chunk(2, dim=-1)  # [T, rotary_dim / 2]
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out

    return rotate(q), rotate(k)


@triton.jit
def _rope_heads(x_ptr, o_ptr, t, stride_t, stride_h, stride_ot, stride_oh, cos, sin,
                NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < NUM_HEADS) & (j < HALF)
    src = x_ptr + t * stride_t + h * stride_h
    dst = o_ptr + t * stride_ot + h * stride_oh
    x1 = tl.load(src + j, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_HALF]
    x2 = tl.load(src + HALF + j, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + j, (x1 * cos - x2 * sin).to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF + j, (x2 * cos + x1 * sin).to(o_ptr.dtype.element_ty), mask=mask)
    if BLOCK_REST > 0:  # partial rotary: the channels past rotary_dim pass through
        r = 2 * HALF + tl.arange(0, BLOCK_REST)[None, :]
        rmask = (h < NUM_HEADS) & (r < HEAD_DIM)
        tl.store(dst + r, tl.load(src + r, mask=rmask), mask=rmask)


@triton.jit
def _rope_kernel(
    pos_ptr, q_ptr, k_ptr, cs_ptr, qo_ptr, ko_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cs_ptr + pos * stride_cs + j, mask=j < HALF, other=0.0)  # [1, BLOCK_HALF]
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + j, mask=j < HALF, other=0.0)
    _rope_heads(q_ptr, qo_ptr, t, stride_qt, stride_qh, stride_qot, stride_qoh, cos, sin,
                NUM_HEADS, HEAD_DIM, HALF, BLOCK_H, BLOCK_HALF, BLOCK_REST)
    _rope_heads(k_ptr, ko_ptr, t, stride_kt, stride_kh, stride_kot, stride_koh, cos, sin,
                NUM_KV_HEADS, HEAD_DIM, HALF, BLOCK_KH, BLOCK_HALF, BLOCK_REST)


def apply_rope(
    positions: torch.Tensor,  # [num_tokens]
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin: torch.Tensor,  # [max_positions, rotary_dim]
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_heads, head_dim = q.shape
    rotary_dim = cos_sin.shape[1]
    if k.dim() != 3 or k.shape[0] != num_tokens or k.shape[2] != head_dim or positions.shape != (num_tokens,):
        raise ValueError(f"apply_rope shapes: positions {tuple(positions.shape)} q {tuple(q.shape)} "
                         f"k {tuple(k.shape)}")
    if rotary_dim % 2 or rotary_dim > head_dim or cos_sin.stride(1) != 1 or cos_sin.dtype != torch.float32:
        raise ValueError(f"cos_sin must be fp32 [positions, rotary_dim <= {head_dim}, even], "
                         f"got {cos_sin.dtype} {tuple(cos_sin.shape)}")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("apply_rope needs a contiguous head_dim")
    q_out, k_out = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format)
    if num_tokens:
        rest = head_dim - rotary_dim
        _rope_kernel[(num_tokens,)](
            positions, q, k, cos_sin, q_out, k_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1),
            k_out.stride(0), k_out.stride(1), cos_sin.stride(0),
            NUM_HEADS=num_heads, NUM_KV_HEADS=k.shape[1], HEAD_DIM=head_dim, HALF=rotary_dim // 2,
            BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
            BLOCK_HALF=triton.next_power_of_2(rotary_dim // 2),
            BLOCK_REST=triton.next_power_of_2(rest) if rest else 0, num_warps=4,
        )
    return q_out, k_out
