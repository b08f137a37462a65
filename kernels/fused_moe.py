"""Fused MoE experts: a grouped GEMM over (token, slot) pairs sorted by expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_experts_ref(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * inter, hidden]  (gate rows then up rows)
    w2: torch.Tensor,  # [num_experts, hidden, inter]
    topk_weights: torch.Tensor,  # [num_tokens, top_k] fp32
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int, -1 = slot not handled here
) -> torch.Tensor:
    """sum_k w[t,k] * down(silu(gate(x_t)) * up(x_t)) over the token's experts; [num_tokens, hidden]."""
    num_tokens, top_k = topk_ids.shape
    out = torch.zeros(num_tokens, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.reshape(-1)
    for e in flat_ids[flat_ids >= 0].unique().tolist():
        token_ids, slot_ids = (topk_ids == e).nonzero(as_tuple=True)
        x = hidden[token_ids]
        gate, up = (x @ w13[e].t()).chunk(2, dim=-1)
        y = (F.silu(gate.float()) * up.float()).to(hidden.dtype) @ w2[e].t()
        out.index_add_(0, token_ids, y.float() * topk_weights[token_ids, slot_ids, None])
    return out.to(hidden.dtype)
