"""MoE routers: pick top-k experts per token and their combine weights."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def topk_softmax_ref(
    router_logits: torch.Tensor,  # [num_tokens, num_experts]
    top_k: int,
    renormalize: bool,
    slots: torch.Tensor | None = None,  # [num_tokens] int: a row whose slot is < 0 is padding, its ids -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax routing (Qwen3-MoE, Mixtral). Returns weights fp32 [T, k] and ids int32 [T, k]."""
    probs = router_logits.float().softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, _mask_padding(ids.to(torch.int32), slots)


def _mask_padding(ids: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
    # padding rows (slot -1) route nowhere: expert id -1 means no expert work, nothing sent, not counted
    if slots is None:
        return ids
    _check_slots(slots, ids.shape[0])
    return ids.masked_fill(slots.unsqueeze(1) < 0, -1)


def _check_slots(slots: torch.Tensor, num_tokens: int) -> None:
    # slot ids, not a padding mask: a bool tensor here would silently mask nothing
    if slots.shape != (num_tokens,) or slots.stride(0) != 1 or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be contiguous int32/int64 [{num_tokens}] slot ids (< 0: padding), got "
                         f"{slots.dtype} {tuple(slots.shape)}")


def topk_sigmoid_grouped_ref(
    router_logits: torch.Tensor,  # [num_tokens, num_experts]
    correction_bias: torch.Tensor,  # [num_experts], only steers the choice
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    routed_scaling_factor: float,
    slots: torch.Tensor | None = None,  # [num_tokens] int: a row whose slot is < 0 is padding, its ids -1
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
    return weights * routed_scaling_factor, _mask_padding(ids.to(torch.int32), slots)


# ---------------------------------------------------------------- Triton kernels


@triton.jit
def _max_nan_first(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _pick_max(x, e, BIG: tl.constexpr):
    # per row: the max of x and the lowest column holding it; x [BLOCK_T, BLOCK_E], e [1, BLOCK_E]. NaN ranks above
    # every number (torch.topk's order, and the packed keys' of kernels/router_fused.py): tl.max skips NaN, so a row
    # of NaN (a NaN hidden state) matched no column and got expert id BIG (>= num_experts, or a padding column's)
    m = tl.reduce(x, 1, _max_nan_first)
    idx = tl.min(tl.where((x == m[:, None]) | (x != x), e, BIG), 1)  # (m is NaN while any NaN is left)
    return m, idx


@triton.jit
def _mask_padding_ids(top_ids, slots_ptr, t, tmask, HAS_SLOTS: tl.constexpr):
    # top_ids [BLOCK_T, BLOCK_K]: rows whose slot is < 0 (padding) get expert id -1
    if HAS_SLOTS:
        pad = tl.load(slots_ptr + t, mask=tmask, other=0) < 0
        top_ids = tl.where(pad[:, None], -1, top_ids)
    return top_ids


@triton.jit
def _softmax_top_k(x, e, k, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    # x [BLOCK_T, BLOCK_E] fp32 logits, -inf past the last expert; e [1, BLOCK_E], k [1, BLOCK_K] column ids.
    # Returns weights [BLOCK_T, BLOCK_K] fp32 and ids [BLOCK_T, BLOCK_K] int32 (columns >= TOP_K: junk)
    row_max = tl.max(x, 1)
    if RENORMALIZE:  # the picks' exps added one by one in pick order: the same bits in any layout (router_fused)
        denom = tl.zeros([BLOCK_T], tl.float32)
    else:
        denom = tl.sum(tl.exp(x - row_max[:, None]), 1)  # [BLOCK_T]
    top_vals = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    top_ids = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for i in tl.static_range(TOP_K):
        m, idx = _pick_max(x, e, x.shape[1])
        v = tl.exp(m - row_max)
        top_vals = tl.where(k == i, v[:, None], top_vals)
        top_ids = tl.where(k == i, idx[:, None], top_ids)
        x = tl.where(e == idx[:, None], float("-inf"), x)
        if RENORMALIZE:
            denom += v
    return top_vals / denom[:, None], top_ids


@triton.jit
def _sigmoid_grouped_top_k(
    x, bias, e, k, routed_scaling_factor, NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, NUM_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    # x [BLOCK_T, BLOCK_E] fp32 logits, bias [1, BLOCK_E] fp32 (any value past the last expert); e, k column ids.
    # Returns weights [BLOCK_T, BLOCK_K] fp32 (scaled) and ids [BLOCK_T, BLOCK_K] int32 (columns >= TOP_K: junk)
    BLOCK_E: tl.constexpr = x.shape[1]
    emask = e < NUM_EXPERTS
    scores = tl.sigmoid(x)
    choice = tl.where(emask, scores + bias, float("-inf"))
    if NUM_GROUPS > 1:
        # group score = sum of its two best experts; keep the TOPK_GROUPS best groups
        group = e // (NUM_EXPERTS // NUM_GROUPS)
        gcol = tl.arange(0, BLOCK_G)[None, :]
        group_scores = tl.full([BLOCK_T, BLOCK_G], float("-inf"), tl.float32)
        for gi in tl.static_range(NUM_GROUPS):
            c = tl.where(group == gi, choice, float("-inf"))
            m1, i1 = _pick_max(c, e, BLOCK_E)
            m2 = tl.max(tl.where(e == i1[:, None], float("-inf"), c), 1)
            group_scores = tl.where(gcol == gi, (m1 + m2)[:, None], group_scores)
        keep = tl.zeros([BLOCK_T, BLOCK_E], tl.int1)
        for _ in tl.static_range(TOPK_GROUPS):
            _, gi = _pick_max(group_scores, gcol, BLOCK_G)
            keep = keep | (group == gi[:, None])
            group_scores = tl.where(gcol == gi[:, None], float("-inf"), group_scores)
        choice = tl.where(keep, choice, float("-inf"))
    top_vals = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    top_ids = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for i in tl.static_range(TOP_K):
        _, idx = _pick_max(choice, e, BLOCK_E)
        w = tl.sum(tl.where(e == idx[:, None], scores, 0.0), 1)
        top_vals = tl.where(k == i, w[:, None], top_vals)
        top_ids = tl.where(k == i, idx[:, None], top_ids)
        choice = tl.where(e == idx[:, None], float("-inf"), choice)
    if RENORMALIZE:
        top_vals = top_vals / (tl.sum(top_vals, 1)[:, None] + 1e-20)
    return top_vals * routed_scaling_factor, top_ids


@triton.jit
def _store_top_k(weights_ptr, ids_ptr, slots_ptr, top_vals, top_ids, t, tmask, k, TOP_K: tl.constexpr,
                 HAS_SLOTS: tl.constexpr):
    # rows t of the [num_tokens, TOP_K] outputs; padding rows (slot < 0) get ids -1
    omask = tmask[:, None] & (k < TOP_K)
    tl.store(weights_ptr + t[:, None] * TOP_K + k, top_vals, mask=omask)
    tl.store(ids_ptr + t[:, None] * TOP_K + k, _mask_padding_ids(top_ids, slots_ptr, t, tmask, HAS_SLOTS), mask=omask)


# one variant for every step size, and for a slots slice at any offset (a TP rank's share of the batch)
@triton.jit(do_not_specialize=["num_tokens"], do_not_specialize_on_alignment=["slots_ptr"])
def _topk_softmax_kernel(
    logits_ptr, weights_ptr, ids_ptr, slots_ptr, num_tokens, stride_t,
    NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_SLOTS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)[None, :]
    k = tl.arange(0, BLOCK_K)[None, :]
    tmask = t < num_tokens
    x = tl.load(logits_ptr + t.to(tl.int64)[:, None] * stride_t + e,
                mask=tmask[:, None] & (e < NUM_EXPERTS), other=float("-inf")).to(tl.float32)
    top_vals, top_ids = _softmax_top_k(x, e, k, TOP_K, RENORMALIZE, BLOCK_T, BLOCK_K)
    _store_top_k(weights_ptr, ids_ptr, slots_ptr, top_vals, top_ids, t, tmask, k, TOP_K, HAS_SLOTS)


# one variant for every step size, and for a slots slice at any offset (a TP rank's share of the batch)
@triton.jit(do_not_specialize=["num_tokens"], do_not_specialize_on_alignment=["slots_ptr"])
def _topk_sigmoid_grouped_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, slots_ptr, num_tokens, stride_t, routed_scaling_factor,
    NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, NUM_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
    RENORMALIZE: tl.constexpr, HAS_SLOTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)[None, :]
    k = tl.arange(0, BLOCK_K)[None, :]
    tmask = t < num_tokens
    emask = e < NUM_EXPERTS
    x = tl.load(logits_ptr + t.to(tl.int64)[:, None] * stride_t + e,
                mask=tmask[:, None] & emask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + e, mask=emask, other=0.0).to(tl.float32)
    top_vals, top_ids = _sigmoid_grouped_top_k(x, bias, e, k, routed_scaling_factor, NUM_EXPERTS, TOP_K, NUM_GROUPS,
                                               TOPK_GROUPS, RENORMALIZE, BLOCK_T, BLOCK_K, BLOCK_G)
    _store_top_k(weights_ptr, ids_ptr, slots_ptr, top_vals, top_ids, t, tmask, k, TOP_K, HAS_SLOTS)


# ---------------------------------------------------------------- checked wrappers


def _check_logits(router_logits: torch.Tensor, top_k: int, slots: torch.Tensor | None) -> tuple[int, int]:
    if router_logits.dim() != 2 or router_logits.stride(1) != 1:
        raise ValueError(f"router_logits must be [num_tokens, num_experts] with contiguous rows, "
                         f"got {tuple(router_logits.shape)} strides {router_logits.stride()}")
    num_tokens, num_experts = router_logits.shape
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    if slots is not None:
        _check_slots(slots, num_tokens)
    return num_tokens, num_experts


def _block_t(num_experts: int) -> int:
    return max(1, min(16, 4096 // triton.next_power_of_2(num_experts)))


def topk_softmax(
    router_logits: torch.Tensor,  # [num_tokens, num_experts]
    top_k: int,
    renormalize: bool,
    slots: torch.Tensor | None = None,  # [num_tokens] int: a row whose slot is < 0 is padding, its ids -1
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = _check_logits(router_logits, top_k, slots)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    block_t = _block_t(num_experts)
    _topk_softmax_kernel[(triton.cdiv(num_tokens, block_t),)](
        router_logits, weights, ids, slots if slots is not None else ids, num_tokens, router_logits.stride(0),
        NUM_EXPERTS=num_experts, TOP_K=top_k, RENORMALIZE=renormalize, HAS_SLOTS=slots is not None, BLOCK_T=block_t,
        BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_K=triton.next_power_of_2(top_k), num_warps=4,
    )
    return weights, ids


def topk_sigmoid_grouped(
    router_logits: torch.Tensor,  # [num_tokens, num_experts]
    correction_bias: torch.Tensor,  # [num_experts], only steers the choice
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    routed_scaling_factor: float,
    slots: torch.Tensor | None = None,  # [num_tokens] int: a row whose slot is < 0 is padding, its ids -1
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = _check_logits(router_logits, top_k, slots)
    if correction_bias.shape != (num_experts,) or not correction_bias.is_contiguous():
        raise ValueError(f"correction_bias must be contiguous [{num_experts}], got {tuple(correction_bias.shape)}")
    if num_experts % num_groups or not 0 < topk_groups <= num_groups:
        raise ValueError(f"num_groups={num_groups} must divide num_experts={num_experts} and "
                         f"topk_groups={topk_groups} be in [1, num_groups]")
    if top_k > topk_groups * (num_experts // num_groups):
        raise ValueError(f"top_k={top_k} exceeds the experts of the {topk_groups} chosen groups")
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    block_t = _block_t(num_experts)
    _topk_sigmoid_grouped_kernel[(triton.cdiv(num_tokens, block_t),)](
        router_logits, correction_bias, weights, ids, slots if slots is not None else ids, num_tokens,
        router_logits.stride(0), float(routed_scaling_factor),
        NUM_EXPERTS=num_experts, TOP_K=top_k, NUM_GROUPS=num_groups, TOPK_GROUPS=topk_groups,
        RENORMALIZE=renormalize, HAS_SLOTS=slots is not None, BLOCK_T=block_t,
        BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_G=triton.next_power_of_2(num_groups), num_warps=4,
    )
    return weights, ids
