"""Mixed steps (decodes + a prompt's chunk) padded to token buckets and replayed as CUDA graphs.

Eagerly, a mixed step of Qwen3-30B-A3B shapes costs ~1,100 kernel launches of host time (90-128 ms on an
H200 for ~18 ms of GPU work); every prompt arrival stalled every stream that long. A step whose token count
fits a bucket is planned at the bucket's size instead, in a layout that depends on no per-step host int:
- tokens past the real ones are padding: slot -1 (no KV write, no expert work), in no sequence;
- rows(bucket) sequence rows, the batch's first; the rest have q_len 0 and seq_len 0;
- the prefill attention runs a fixed grid of num_tiles(bucket) programs over a tile map built on the host:
  tile t -> (row, q block of prefill_tile_q tokens), longest first; unused tiles have row -1;
- the block table is copied into a static [rows, max_blocks_per_seq] buffer (its width follows the batch).
Each bucket's whole forward is one CUDA graph; the lm head and sampling run after it on the rows to sample.
Without capture (CPU, tests) the same padded plan runs eagerly, so the layout is tested without a GPU.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from kernels.attention.prefill import prefill_tile_q
from models.forward_batch import AttentionBackend, ForwardBatch
from runtime.distributed.parallel import track_cuda_graph

logger = logging.getLogger(__name__)

SMALLEST_BUCKET = 64


def mixed_graph_sizes(max_tokens: int) -> list[int]:
    """Powers of two from SMALLEST_BUCKET below max_tokens, then max_tokens itself; [] when 0 (off)."""
    if max_tokens <= 0:
        return []
    sizes = [s for s in (SMALLEST_BUCKET << i for i in range(max_tokens.bit_length())) if s < max_tokens]
    return sizes + [max_tokens]


def model_tile_q(model: torch.nn.Module, kv_dtype: torch.dtype, device: torch.device) -> int:
    """The prefill kernel's query tokens per tile for this model's (TP-local) attention heads and KV cache."""
    attn = model.model.layers[0].self_attn  # every architecture here is a DecoderLM
    return prefill_tile_q(attn.num_heads, attn.num_kv_heads, attn.head_dim, kv_dtype, device)


def fill_tile_map(
    tiles: np.ndarray,  # [num_tiles, 2] int32, filled: (row, q block), row -1 past the real tiles
    q_lens: np.ndarray,  # [batch] query tokens per row
    seq_lens: np.ndarray,  # [batch] kv length per row incl. this step's tokens
    tile_q: int,
) -> None:
    q_lens = q_lens.astype(np.int64)
    per_row = -(-q_lens // tile_q)
    num_real = int(per_row.sum())
    if num_real > tiles.shape[0]:
        raise ValueError(f"{num_real} prefill tiles do not fit the bucket's {tiles.shape[0]}")
    rows = np.repeat(np.arange(len(q_lens)), per_row)
    q_blocks = np.arange(num_real) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    # longest first, so the long tiles start in the first wave: a tile reads keys up to ctx + its last query
    ctx = seq_lens.astype(np.int64) - q_lens
    work = np.minimum(seq_lens[rows], ctx[rows] + (q_blocks + 1) * tile_q)
    order = np.argsort(-work, kind="stable")
    tiles[:num_real, 0] = rows[order]
    tiles[:num_real, 1] = q_blocks[order]
    tiles[num_real:] = (-1, 0)


class MixedGraphs:
    """The buckets and their layout (host side, always); capture() adds one CUDA graph per bucket."""

    def __init__(self, sizes: list[int], max_rows: int, tile_q: int) -> None:
        if not sizes or max_rows <= 0:
            raise ValueError(f"mixed buckets need sizes and rows, got {sizes} / {max_rows}")
        self.sizes = sizes
        self.max_rows = max_rows
        self.tile_q = tile_q
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def bucket(self, num_tokens: int) -> int | None:
        return next((s for s in self.sizes if s >= num_tokens), None)

    def rows(self, size: int) -> int:
        return min(size, self.max_rows)  # every real row holds at least one token

    def num_tiles(self, size: int) -> int:
        # a row of q tokens takes ceil(q / tile_q) <= q / tile_q + 1 tiles
        return -(-size // self.tile_q) + self.rows(size)

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def capture(
        self,
        model: torch.nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn_backend: AttentionBackend,
        max_blocks_per_seq: int,
        device: torch.device,
    ) -> None:
        t0 = time.perf_counter()
        n, r = self.sizes[-1], self.rows(self.sizes[-1])
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.cu_seqlens_q = torch.zeros(r + 1, **i32)
        self.seq_lens = torch.zeros(r, **i32)
        self.block_tables = torch.zeros(r, max_blocks_per_seq, **i32)
        self.tiles = torch.tensor([[-1, 0]], **i32).repeat(self.num_tiles(n), 1)  # [max tiles, 2]
        pool = None
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            rows = self.rows(size)
            fb = ForwardBatch(
                slot_mapping=self.slot_mapping[:size],
                cu_seqlens_q=self.cu_seqlens_q[: rows + 1],
                seq_lens=self.seq_lens[:rows],
                block_tables=self.block_tables[:rows],
                max_seqlen_q=size,  # not read: the tile map drives the grid
                max_seqlen_k=max_blocks_per_seq * kv_caches[0][0].shape[1],
                is_decode=False,
                kv_caches=kv_caches,
                attn_backend=attn_backend,
                prefill_tiles=self.tiles[: self.num_tiles(size)],
            )
            args = (self.input_ids[:size], self.positions[:size], fb)
            model(*args)  # warm up: compile kernels, allocate workspaces outside the graph
            torch.cuda.synchronize(device)
            graph = track_cuda_graph(torch.cuda.CUDAGraph())
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = model(*args)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(device)
        logger.info("captured %d CUDA graphs for mixed steps of %s tokens (%d rows at most) in %.1f s",
                    len(self.sizes), self.sizes, self.max_rows, time.perf_counter() - t0)

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        # the plan is already padded to the bucket: [size] tokens, [rows(size)] rows, [num_tiles(size)] tiles
        size = input_ids.shape[0]
        rows = fb.seq_lens.shape[0]
        assert fb.prefill_tiles is not None and size in self.graphs and rows == self.rows(size)
        self.input_ids[:size].copy_(input_ids)
        self.positions[:size].copy_(positions)
        self.slot_mapping[:size].copy_(fb.slot_mapping)
        self.cu_seqlens_q[: rows + 1].copy_(fb.cu_seqlens_q)
        self.seq_lens[:rows].copy_(fb.seq_lens)
        self.block_tables[:rows, : fb.block_tables.shape[1]].copy_(fb.block_tables)
        self.tiles[: fb.prefill_tiles.shape[0]].copy_(fb.prefill_tiles)
        self.graphs[size].replay()
        return self.outputs[size]

    def replay_dummy(self, size: int) -> None:
        # a lockstep filler of a mixed size: no tile, no KV slot; the MoE masks every token, but the graph
        # issues the collectives of a real step of this size
        self.slot_mapping[:size].fill_(-1)
        self.tiles[: self.num_tiles(size), 0].fill_(-1)
        self.graphs[size].replay()
