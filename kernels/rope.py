"""Rotary position embedding (neox layout: rotate halves), with partial rotary support."""

from __future__ import annotations

import torch


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
