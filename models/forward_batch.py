"""Per-step metadata handed explicitly to model.forward (never a global)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class AttentionBackend(Protocol):
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor: ...  # [num_tokens, num_heads, head_dim]

    def kv_target(self, layer_id: int, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        ...  # (k_cache, v_cache, k_scale, v_scale): where this step's K/V go

    def forward_stored(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch, scale: float) -> torch.Tensor:
        ...  # forward with this step's K/V already in the cache (a dummy batch: zeros)

    # optional (where decode_fused is set): a decode step from the QKV rows, the attention prologue (q/k norm, RoPE,
    # the K/V store) inside the decode kernel; runtime/engine/attention_backend.py PagedAttention
    # def forward_decode_fused(self, qkv, positions, cos_sin, q_norm_weight, k_norm_weight, eps, layer_id, batch,
    #                          scale) -> torch.Tensor: [batch, num_heads, head_dim]


@dataclass
class ForwardBatch:
    # attention metadata, all on the model's device
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = padding (no KV write)
    cu_seqlens_q: torch.Tensor  # [batch + 1] int32
    seq_lens: torch.Tensor  # [batch] int32, kv length including this step's tokens; 0 = padding row
    block_tables: torch.Tensor  # [batch, max_blocks_per_seq] int32
    max_seqlen_q: int
    max_seqlen_k: int
    is_decode: bool  # every sequence has exactly one query token (row b = token b)
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [num_blocks, block_size, kv_heads, head_dim]
    attn_backend: AttentionBackend
    # [num_tiles, 2] int32 (row, q block), row -1 = none: the prefill attention runs this fixed grid instead of
    # one sized by max_seqlen_q and the batch (CUDA-graph-replayed mixed steps, runtime/engine/mixed_graphs.py)
    prefill_tiles: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.seq_lens.shape[0]
