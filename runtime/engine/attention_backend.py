"""Attention backends: store this step's K/V into the paged cache (or take them stored), then attend over it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.forward_batch import ForwardBatch

KvScales = list[tuple[float, float]]  # per layer: (k_scale, v_scale) of an FP8 KV cache


class PagedAttention:
    """One implementation of the AttentionBackend protocol, over a set of three kernels."""

    def __init__(self, store_kv: Callable, prefill: Callable, decode: Callable,
                 kv_scales: KvScales | None = None, decode_fused: Callable | None = None) -> None:
        self.store_kv = store_kv
        self.prefill = prefill
        self.decode = decode
        self.kv_scales = kv_scales  # None: every scale is 1.0 (and a float cache ignores them)
        self.decode_fused = decode_fused  # from the QKV rows, the prologue inside (kernels/attention/decode_fused.py)

    def kv_target(self, layer_id: int, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(k_cache, v_cache, k_scale, v_scale) of a layer: where a fused prologue stores this step's K/V."""
        k_cache, v_cache = batch.kv_caches[layer_id]
        k_scale, v_scale = self.kv_scales[layer_id] if self.kv_scales is not None else (1.0, 1.0)
        return k_cache, v_cache, k_scale, v_scale

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        k_cache, v_cache, k_scale, v_scale = self.kv_target(layer_id, batch)
        self.store_kv(k, v, k_cache, v_cache, batch.slot_mapping, k_scale, v_scale)
        return self.forward_stored(q, layer_id, batch, scale, k, v)

    def forward_stored(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch, scale: float,
                       k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over the cache, this step's K/V already in it (stored by the caller, e.g. the fused
        q/k-norm + RoPE + KV-store prologue); q [num_tokens, num_heads, head_dim]. k / v: this step's K/V
        [num_tokens, num_kv_heads, head_dim] if the caller has them: a prefill config's RAGGED path reads the
        chunk's keys from there instead of the pages."""
        k_cache, v_cache, k_scale, v_scale = self.kv_target(layer_id, batch)
        if batch.is_decode:
            return self.decode(q, k_cache, v_cache, batch.seq_lens, batch.block_tables, scale, k_scale, v_scale)
        return self.prefill(q, k_cache, v_cache, batch.cu_seqlens_q, batch.seq_lens, batch.block_tables, scale,
                            batch.max_seqlen_q, k_scale, v_scale, tile_map=batch.prefill_tiles, k=k, v=v)


    def forward_decode_fused(self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                             q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
                             layer_id: int, batch: ForwardBatch, scale: float) -> torch.Tensor:
        """A decode step from the QKV projection's rows qkv [batch, (heads + 2 kv_heads) * head_dim]: q/k norm, RoPE
        and this step's K/V store inside the decode attention; [batch, num_heads, head_dim]."""
        k_cache, v_cache, k_scale, v_scale = self.kv_target(layer_id, batch)
        return self.decode_fused(qkv, positions, cos_sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache,
                                 batch.slot_mapping, batch.seq_lens, batch.block_tables, scale, k_scale, v_scale)


def torch_attention(kv_scales: KvScales | None = None) -> PagedAttention:
    from kernels.attention.decode import paged_attention_decode_ref
    from kernels.attention.decode_fused import paged_attention_decode_fused_ref
    from kernels.attention.prefill import paged_attention_prefill_ref, store_kv_ref

    return PagedAttention(store_kv_ref, paged_attention_prefill_ref, paged_attention_decode_ref, kv_scales,
                          paged_attention_decode_fused_ref)


def triton_attention(kv_scales: KvScales | None = None) -> PagedAttention:
    from kernels.attention.decode import paged_attention_decode
    from kernels.attention.decode_fused import paged_attention_decode_fused
    from kernels.attention.prefill import paged_attention_prefill, store_kv

    return PagedAttention(store_kv, paged_attention_prefill, paged_attention_decode, kv_scales,
                          paged_attention_decode_fused)


ATTENTION_BACKENDS: dict[str, Callable[..., PagedAttention]] = {"torch": torch_attention, "triton": triton_attention}
