"""Decode steps captured as CUDA graphs, one per padded batch size, sharing one memory pool.

Inputs live in static buffers that each step copies into; padding rows have seq_len 0 and slot -1,
which the kernels skip. A dummy (lockstep) step replays a graph of its own per size: only the MoE layers'
dispatch / local experts / combine (models/moe.py DummyForward), the same collectives as a real step of
that size and nothing else.
"""

from __future__ import annotations

import logging

import torch

from models.forward_batch import AttentionBackend, ForwardBatch
from models.moe import DummyForward
from runtime.distributed.parallel import track_cuda_graph

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class CudaGraphRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn_backend: AttentionBackend,
        max_batch: int,
        max_blocks_per_seq: int,
        device: torch.device,
        dummy: DummyForward | None = None,
    ) -> None:
        self.model = model
        self.sizes = graph_batch_sizes(max_batch)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.batches: dict[int, ForwardBatch] = {}
        self.dummy_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # empty: no MoE layer with collectives
        pool = None
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            fb = ForwardBatch(
                slot_mapping=self.slot_mapping[:size],
                cu_seqlens_q=self.cu_seqlens_q[: size + 1],
                seq_lens=self.seq_lens[:size],
                block_tables=self.block_tables[:size],
                max_seqlen_q=1,
                max_seqlen_k=max_blocks_per_seq * kv_caches[0][0].shape[1],
                is_decode=True,
                kv_caches=kv_caches,
                attn_backend=attn_backend,
            )
            args = (self.input_ids[:size], self.positions[:size], fb)
            self.model(*args)  # warm up: compile kernels, allocate workspaces outside the graph
            torch.cuda.synchronize(device)
            graph = track_cuda_graph(torch.cuda.CUDAGraph())
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.model(*args)
            pool = graph.pool()
            self.graphs[size] = graph
            self.batches[size] = fb
            if dummy is not None and dummy.layers:
                # every EP rank captures the same sizes in the same order, so the warm-up collectives pair up
                dummy(size)
                torch.cuda.synchronize(device)
                self.dummy_graphs[size] = graph = track_cuda_graph(torch.cuda.CUDAGraph())
                with torch.cuda.graph(graph, pool=pool):
                    dummy(size)
        torch.cuda.synchronize(device)
        logger.info("captured %d CUDA graphs for decode batch sizes up to %d (%d for dummy steps)", len(self.sizes), n,
                    len(self.dummy_graphs))

    def bucket(self, num_tokens: int) -> int | None:
        for size in self.sizes:
            if size >= num_tokens:
                return size
        return None

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        n = input_ids.shape[0]
        size = self.bucket(n)
        assert size is not None
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(fb.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[:n].copy_(fb.seq_lens)
        self.seq_lens[n:size].zero_()
        width = fb.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(fb.block_tables)
        self.graphs[size].replay()
        return self.outputs[size][:n]

    def replay_dummy(self, num_tokens: int) -> None:
        size = self.bucket(num_tokens)
        assert size is not None
        if size in self.dummy_graphs:
            self.dummy_graphs[size].replay()
