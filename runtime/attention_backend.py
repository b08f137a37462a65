"""Attention backends: store this step's K/V into the paged cache, then attend over it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from runtime.forward_batch import ForwardBatch


class PagedAttention:
    """One implementation of the AttentionBackend protocol, over a set of three kernels."""

    def __init__(self, store_kv: Callable, prefill: Callable, decode: Callable) -> None:
        self.store_kv = store_kv
        self.prefill = prefill
        self.decode = decode

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        if batch.is_dummy:  # lockstep filler: nothing real to attend to, nothing to store
            return torch.zeros_like(q)
        k_cache, v_cache = batch.kv_caches[layer_id]
        self.store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        if batch.is_decode:
            return self.decode(q, k_cache, v_cache, batch.seq_lens, batch.block_tables, scale)
        return self.prefill(
            q, k_cache, v_cache, batch.cu_seqlens_q, batch.seq_lens, batch.block_tables, scale, batch.max_seqlen_q
        )


def torch_attention() -> PagedAttention:
    from kernels.attention import paged_attention_decode_ref, paged_attention_prefill_ref, store_kv_ref

    return PagedAttention(store_kv_ref, paged_attention_prefill_ref, paged_attention_decode_ref)


def triton_attention() -> PagedAttention:
    from kernels.attention import paged_attention_decode, paged_attention_prefill, store_kv

    return PagedAttention(store_kv, paged_attention_prefill, paged_attention_decode)


ATTENTION_BACKENDS: dict[str, Callable[[], PagedAttention]] = {"torch": torch_attention, "triton": triton_attention}
