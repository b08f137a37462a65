"""Expert-parallel token exchange: the one all2all interface the MoE layer calls, and a registry of backends.

dispatch hands each of this rank's tokens to the EP ranks holding its experts (with those ranks' *local*
expert ids, -1 elsewhere, and the routing weights); the rank runs its local experts on what it received;
combine sends the weighted partial sums back and adds them per token. What dispatch does, combine undoes.
Backends, chosen by --all2all-backend (runtime/config.py ALL2ALL_BACKENDS):
- "sparse" (runtime/distributed/all2all_sparse.py, the default): each token goes once to each rank that holds one of
  its experts;
- "allgather": every token to every rank, masked on arrival; fixed equal splits, the simple baseline.
With ep_size == 1 nothing moves ("local"). Every EP rank must call with the same T: the coordinator's
pad_to guarantees it. Padding rows arrive with expert id -1 (the MoE layer masks them) and cost nothing.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from runtime.config import ConfigError
from runtime.distributed.expert_stats import ExpertStats
from runtime.distributed.parallel import ParallelState

_ALIGN = 16  # bytes; rows of a packed send buffer start aligned for any dtype view


class All2AllBackend(ABC):
    """dispatch(hidden [T, H], topk_weights [T, k] fp32, topk_ids [T, k] int global ids, -1 = padding)
    -> (hidden_recv [N, H], weights_recv [N, k] fp32, local_ids_recv [N, k] int32 in [0, E_local) or -1, handle);
    the local experts turn hidden_recv into out_recv [N, H]; combine(out_recv, handle) -> [T, H], each token's
    weighted expert outputs summed over all ranks. Experts are placed in contiguous slices: rank r holds
    global ids [r * E_local, (r + 1) * E_local)."""

    def __init__(self, parallel: ParallelState, num_experts: int, capacity: int, stats: ExpertStats | None = None,
                 static_max_tokens: int = 0, fp8_dispatch: bool = False) -> None:
        if num_experts % parallel.ep_size:
            raise ConfigError(f"{num_experts} experts are not divisible by the expert-parallel size "
                              f"{parallel.ep_size}")
        if capacity <= 0:
            raise ConfigError(f"--expert-token-capacity must be positive, got {capacity}")
        self.parallel = parallel
        self.ep_size = parallel.ep_size
        self.ep_rank = parallel.ep_rank
        self.num_experts = num_experts
        self.num_local_experts = num_experts // parallel.ep_size
        self.capacity = capacity  # rows per (source, destination) pair per collective
        self.stats = stats
        self.static_max_tokens = static_max_tokens  # steps up to this size may be CUDA-graph captured
        self.fp8_dispatch = fp8_dispatch
        # placement: global expert id -> (EP rank, local id)
        ids = torch.arange(num_experts, device=parallel.device)
        self.expert_rank = ids // self.num_local_experts
        self.expert_local = ids % self.num_local_experts

    def place(self, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Destination rank and local id of every (token, slot), both -1 on padding: [T, k] int64 each."""
        ids = topk_ids.long()
        valid = ids >= 0
        safe = ids.clamp(min=0)
        return (torch.where(valid, self.expert_rank[safe], -1), torch.where(valid, self.expert_local[safe], -1))

    def record_routing(self, topk_ids: torch.Tensor) -> int:
        return self.stats.record_routing(topk_ids) if self.stats is not None else 0

    def routing_ids_out(self, num_tokens: int, top_k: int) -> torch.Tensor | None:
        """Where the next MoE layer's router may put its ids (the statistics' step buffer), or None."""
        return self.stats.routing_ids_out(num_tokens, top_k) if self.stats is not None else None

    def max_received_rows(self, max_num_tokens: int) -> int:
        """The most rows dispatch() can hand this rank's experts in a step of up to max_num_tokens tokens (the
        start-up warmup compiles the experts for every count up to it: ModelRunner.warmup_local_experts). A
        source sends a token at most once to a rank, and under EP x TP dispatches its TP rank's 1/tp share of the
        step (models/moe.py tp_token_slice): ep_size x that share (the sparse backend's fixed blocks hold fewer)."""
        tp = self.parallel.tp_size if self.ep_size > 1 else 1  # TP without EP: every TP rank routes all rows
        return self.ep_size * -(-max_num_tokens // tp)

    def warm_local_kernels(self, hidden_size: int, top_k: int, dtype: torch.dtype) -> None:
        """Start-up, alone (no collective): compile this backend's own kernels that the collective warmup's
        all-padding steps never launch (ModelRunner.warmup_local_experts calls it). None here."""
        return None

    @abstractmethod
    def dispatch(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]: ...

    @abstractmethod
    def combine(self, out_recv: torch.Tensor, handle: Any) -> torch.Tensor: ...


def validate_capacity(capacity: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Start-up check (allgather): every decode batch must fit one chunk (one collective per layer)."""
    if capacity <= 0:
        raise ConfigError(f"--expert-token-capacity must be positive, got {capacity}")
    if capacity < max_num_seqs:
        raise ConfigError(f"--expert-token-capacity {capacity} is below --max-num-seqs {max_num_seqs}: a decode "
                          f"step would need several all2all rounds per layer; raise it to >= {max_num_seqs}")
    return min(capacity, max_num_batched_tokens)


def default_capacity(max_num_seqs: int, max_num_batched_tokens: int) -> int:
    return min(max_num_batched_tokens, max(max_num_seqs, 1024))


FP8_GROUP = 128  # FP8 dispatch: one scale per 128 channels of a token, as the FP8 experts quantize activations


def row_layout(hidden_size: int, top_k: int, dtype: torch.dtype, fp8: bool = False,
               flag: bool = False) -> tuple[int, int]:
    """One packed row: fp32 weights [k] | int32 local ids [k] | (flag: one int32 word) | (fp8: fp32 scales
    [ceil(H / 128)]) | hidden, padded to 16 B. Returns (byte offset of the hidden part, row bytes); fields start
    aligned for their views (every field is a multiple of 4 bytes)."""
    hidden_offset = 8 * top_k + (4 if flag else 0) + (4 * -(-hidden_size // FP8_GROUP) if fp8 else 0)
    hidden_bytes = hidden_size * (1 if fp8 else dtype.itemsize)
    return hidden_offset, math.ceil((hidden_offset + hidden_bytes) / _ALIGN) * _ALIGN


def allgather_bytes(num_tokens: int, hidden_size: int, top_k: int, dtype: torch.dtype, ep_size: int) -> tuple[int, int]:
    """Remote bytes one rank sends in the allgather backend's dispatch and combine of T tokens (unchunked)."""
    row_bytes = row_layout(hidden_size, top_k, dtype)[1]
    return (ep_size - 1) * num_tokens * row_bytes, (ep_size - 1) * num_tokens * hidden_size * dtype.itemsize


class LocalBackend(All2AllBackend):
    """ep_size == 1: nothing moves; global ids are local ids. Keeps one code path in the MoE layer."""

    # combine() hands the experts' output back as it is: the MoE layer may then leave its top-k sum to the next
    # RMSNorm (models/moe.py can_defer_sum); dispatch() still counts the routing for the expert statistics
    combine_is_identity = True

    def dispatch(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        self.record_routing(topk_ids)
        return hidden, topk_weights, topk_ids, None

    def combine(self, out_recv: torch.Tensor, handle: Any) -> torch.Tensor:
        return out_recv


@dataclass(frozen=True)
class _Handle:
    num_tokens: int  # T before chunk padding
    chunk: int  # rows per destination per chunk
    num_chunks: int
    dtype: torch.dtype
    layer: int


class AllGatherBackend(All2AllBackend):
    """Fixed-size blocks: rank r sends [ep, chunk, row] and receives the same, one all_to_all_single with
    equal splits per direction per chunk (chunk = min(T, capacity)): no sizes ever reach the host, so a
    step can be CUDA-graph captured with the collective inside. Moves EP x T rows whatever the routing."""

    def max_received_rows(self, max_num_tokens: int) -> int:
        # every chunk is padded to `chunk` rows from each rank: ep x chunk x chunks, most at the largest step
        rows = -(-max_num_tokens // self.parallel.tp_size)  # this TP rank's share (models/moe.py tp_token_slice)
        chunk = max(1, min(rows, self.capacity))
        return self.ep_size * chunk * math.ceil(rows / chunk)

    def _exchange(self, send: torch.Tensor) -> torch.Tensor:
        recv = torch.empty_like(send)
        t0 = self.stats.time_start() if self.stats is not None else None
        dist.all_to_all_single(recv, send, group=self.parallel.ep_group)  # equal splits: dim 0 = ep ranks
        if self.stats is not None:
            self.stats.time_stop("all2all", t0)
        return recv

    def _record(self, layer: int, block: torch.Tensor, tokens_sent: Any, tokens_received: Any) -> None:
        if self.stats is not None:
            remote = block.numel() * block.element_size() * (self.ep_size - 1) // self.ep_size
            self.stats.record_exchange(layer, tokens_sent, tokens_received, remote, remote, remote)

    def dispatch(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        num_tokens, hidden_size = hidden.shape
        top_k = topk_ids.shape[1]
        ep = self.ep_size
        chunk = max(1, min(num_tokens, self.capacity))
        num_chunks = max(1, math.ceil(num_tokens / chunk))
        meta_bytes, row_bytes = row_layout(hidden_size, top_k, hidden.dtype)
        hidden_bytes = hidden_size * hidden.dtype.itemsize
        layer = self.record_routing(topk_ids)

        dest, local = self.place(topk_ids)  # [T, k]; padding rows go nowhere (-1)
        ranks = torch.arange(ep, device=hidden.device).view(ep, 1, 1)
        on_dest = dest.unsqueeze(0) == ranks  # [ep, T, k]
        send_ids = torch.where(on_dest, local.to(torch.int32).unsqueeze(0), -1)
        send_w = torch.where(on_dest, topk_weights.float().unsqueeze(0), 0.0)  # [ep, T, k]
        wanted = on_dest.any(dim=2)  # [ep, T]: token t needs rank r
        wanted[self.ep_rank] = False

        hidden_parts, weight_parts, id_parts = [], [], []
        for c in range(num_chunks):
            lo, hi = c * chunk, min((c + 1) * chunk, num_tokens)
            send = torch.zeros(ep, chunk, row_bytes, dtype=torch.uint8, device=hidden.device)
            send[:, : hi - lo, : 4 * top_k].view(torch.float32).copy_(send_w[:, lo:hi])
            send_id_view = send[:, :, 4 * top_k : meta_bytes].view(torch.int32)
            send_id_view.fill_(-1)
            send_id_view[:, : hi - lo].copy_(send_ids[:, lo:hi])
            send[:, : hi - lo, meta_bytes : meta_bytes + hidden_bytes].view(hidden.dtype).copy_(
                hidden[lo:hi].unsqueeze(0).expand(ep, -1, -1))
            recv = self._exchange(send)  # [ep source ranks, chunk, row_bytes]
            received = (recv[:, :, 4 * top_k : meta_bytes].view(torch.int32) >= 0).any(dim=2)  # [ep, chunk]
            received[self.ep_rank] = False
            self._record(layer, send, wanted[:, lo:hi].sum(), received.sum())
            weight_parts.append(recv[:, :, : 4 * top_k].view(torch.float32).reshape(ep * chunk, top_k))
            id_parts.append(recv[:, :, 4 * top_k : meta_bytes].view(torch.int32).reshape(ep * chunk, top_k))
            hidden_parts.append(recv[:, :, meta_bytes : meta_bytes + hidden_bytes].view(hidden.dtype)
                                .reshape(ep * chunk, hidden_size))
        handle = _Handle(num_tokens, chunk, num_chunks, hidden.dtype, layer)
        return torch.cat(hidden_parts), torch.cat(weight_parts), torch.cat(id_parts), handle

    def combine(self, out_recv: torch.Tensor, handle: _Handle) -> torch.Tensor:
        ep, chunk = self.ep_size, handle.chunk
        hidden_size = out_recv.shape[1]
        parts = []
        for c in range(handle.num_chunks):
            block = out_recv[c * ep * chunk : (c + 1) * ep * chunk].reshape(ep, chunk, hidden_size).contiguous()
            back = self._exchange(block)  # [ep expert ranks, chunk, H]: each rank's partial sum of my tokens
            self._record(handle.layer, block, None, None)
            parts.append(back.float().sum(dim=0))
        return torch.cat(parts)[: handle.num_tokens].to(handle.dtype)


# registers "sparse"; at the end since it builds on the interface above
