"""Paged attention over a block-structured KV cache.

Layout (one layer): k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
A token's slot is block_id * block_size + offset; slot -1 marks a padding token.
Query token i of sequence b sits at absolute position seq_lens[b] - q_len_b + i and attends
causally to every cached position <= its own (the cached prefix included).
"""

from __future__ import annotations

import torch


def store_kv_ref(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
) -> None:
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[valid].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[valid].to(v_cache.dtype)


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    return cache[block_table[:num_blocks].long()].reshape(-1, *cache.shape[2:])[:seq_len]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # q [q_len, H, D], k/v [kv_len, KVH, D]; causal with the query block at the end of the kv range
    q_len, num_heads, _ = q.shape
    kv_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
    mask = torch.arange(kv_len, device=q.device)[None, :] > q_pos
    scores.masked_fill_(mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def paged_attention_prefill_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,  # [batch + 1]
    seq_lens: torch.Tensor,  # [batch] kv length including the new tokens
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq]
    scale: float,
    max_seqlen_q: int,
) -> torch.Tensor:
    out = torch.zeros_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        if end == start or seq_len == 0:
            continue
        k = _gather_kv(k_cache, block_tables[b], seq_len)
        v = _gather_kv(v_cache, block_tables[b], seq_len)
        out[start:end] = _attend(q[start:end], k, v, scale)
    return out


def paged_attention_decode_ref(
    q: torch.Tensor,  # [batch, num_heads, head_dim], one query token per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,  # [batch]; 0 = padding row, output zeros
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    out = torch.zeros_like(q)
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        k = _gather_kv(k_cache, block_tables[b], seq_len)
        v = _gather_kv(v_cache, block_tables[b], seq_len)
        out[b : b + 1] = _attend(q[b : b + 1], k, v, scale)
    return out
