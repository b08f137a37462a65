"""Owns the model and its paged KV cache; turns a scheduled batch into tensors, runs it, returns logits."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from runtime.cuda_graph import CudaGraphRunner
from runtime.forward_batch import AttentionBackend, ForwardBatch
from runtime.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor  # [num_padded_tokens]
    positions: torch.Tensor  # [num_padded_tokens]
    forward_batch: ForwardBatch
    sample_rows: list[int]  # token rows whose logits are sampled (the last token of a finished chunk)


def kv_bytes_per_block(model: torch.nn.Module, block_size: int, dtype: torch.dtype) -> int:
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        attn_backend: AttentionBackend,
        cuda_graph_max_batch: int = 0,  # 0 = eager only
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.attn_backend = attn_backend
        # [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]; zeros so stale slots are never NaN
        self.kv_cache = torch.zeros(
            model.num_layers, 2, num_blocks, block_size, model.num_kv_heads, model.head_dim, dtype=dtype, device=device
        )
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(model.num_layers)]
        self.graphs: CudaGraphRunner | None = None
        if cuda_graph_max_batch > 0:
            self.graphs = CudaGraphRunner(
                model, self.kv_caches, attn_backend, cuda_graph_max_batch, self.max_blocks_per_seq, device
            )

    def prepare(self, batch: ScheduledBatch, pad_to: int = 0) -> PreparedBatch:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            input_ids += seq.token_ids[start : start + n]
            positions += range(start, start + n)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            cu_seqlens.append(cu_seqlens[-1] + n)
            seq_lens.append(start + n)
            tables.append(table)
            if start + n == len(seq):
                sample_rows.append(cu_seqlens[-1] - 1)
        is_decode = batch.is_decode and len(batch) > 0
        num_tokens = cu_seqlens[-1]
        pad = max(0, pad_to - num_tokens)
        if pad:
            input_ids += [0] * pad
            positions += [0] * pad
            slots += [-1] * pad
            if is_decode:  # padding rows are sequences of length 0
                cu_seqlens += range(num_tokens + 1, num_tokens + pad + 1)
                seq_lens += [0] * pad
                tables += [[]] * pad
            else:  # one padding sequence holding every padding token, with no KV
                cu_seqlens.append(num_tokens + pad)
                seq_lens.append(0)
                tables.append([])
        width = max(1, max((len(t) for t in tables), default=1))
        block_tables = [t + [0] * (width - len(t)) for t in tables]

        def tensor(data: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

        fb = ForwardBatch(
            slot_mapping=tensor(slots, torch.int64),
            cu_seqlens_q=tensor(cu_seqlens, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            block_tables=tensor(block_tables, torch.int32),
            max_seqlen_q=max(b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])) if len(cu_seqlens) > 1 else 1,
            max_seqlen_k=max(seq_lens, default=0),
            is_decode=is_decode,
            kv_caches=self.kv_caches,
            attn_backend=self.attn_backend,
            num_real_tokens=num_tokens,
        )
        return PreparedBatch(tensor(input_ids, torch.int64), tensor(positions, torch.int64), fb, sample_rows)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, pad_to: int = 0) -> torch.Tensor:
        """Runs one step; returns fp32 logits [num_sampled_seqs, vocab]."""
        prepared = self.prepare(batch, pad_to)
        fb = prepared.forward_batch
        num_padded = prepared.input_ids.shape[0]
        if self.graphs is not None and fb.is_decode and self.graphs.bucket(num_padded) is not None:
            hidden = self.graphs.replay(prepared.input_ids, prepared.positions, fb)
        else:
            hidden = self.model(prepared.input_ids, prepared.positions, fb)
        rows = torch.tensor(prepared.sample_rows, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))

    @torch.inference_mode()
    def execute_dummy(self, num_tokens: int) -> None:
        """A lockstep filler step: the same collectives as a real step of num_tokens tokens, no KV, no output."""
        num_tokens = max(1, num_tokens)
        if self.graphs is not None and self.graphs.bucket(num_tokens) is not None:
            self.graphs.replay_dummy(num_tokens)
            return
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        fb = ForwardBatch(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=self.device),
            cu_seqlens_q=torch.arange(num_tokens + 1, dtype=torch.int32, device=self.device),
            seq_lens=torch.zeros(num_tokens, dtype=torch.int32, device=self.device),
            block_tables=torch.zeros(num_tokens, 1, dtype=torch.int32, device=self.device),
            max_seqlen_q=1,
            max_seqlen_k=0,
            is_decode=True,
            kv_caches=self.kv_caches,
            attn_backend=self.attn_backend,
            is_dummy=True,
            num_real_tokens=0,
        )
        self.model(ids, ids, fb)
