"""MoE routers: pick top-k experts per token and their combine weights."""

from __future__ import annotations

import torch


def topk_softmax_ref(
    router_logits: torch.Tensor,  # [num_tokens, num_experts]
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax routing (Qwen3-MoE, Mixtral). Returns weights fp32 [T, k] and ids int32 [T, k]."""
    probs = router_logits.float().softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def topk_sigmoid_grouped_ref(
    router_logits: torch.Tensor,  # [num_tokens, num_experts]
    correction_bias: torch.Tensor,  # [num_experts], only steers the choice
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased sigmoid routing with group-limited top-k (DeepSeek-V3, GLM-4.5)."""
    num_tokens, num_experts = router_logits.shape
    scores = router_logits.float().sigmoid()
    choice = scores + correction_bias.float()
    group_scores = choice.view(num_tokens, num_groups, -1).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
    group_ids = group_scores.topk(topk_groups, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_ids, 1.0)
    expert_mask = group_mask.repeat_interleave(num_experts // num_groups, dim=1).bool()
    ids = choice.masked_fill(~expert_mask, float("-inf")).topk(top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)
