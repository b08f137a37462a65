"""Expert-parallel token exchange: dispatch and combine, a symmetric pair behind a small interface + registry.

dispatch sends each token to every EP rank (its hidden row once, plus per-destination combine weights and
*local* expert ids, -1 where that rank holds none of the token's experts); the rank runs its local experts on
what it received; combine sends the weighted partial sums back and adds them per token. What dispatch does,
combine undoes.

Backend "all_to_all_single": one torch.distributed.all_to_all_single per direction per chunk, equal splits,
so no sizes ever travel to the host and a decode step can be CUDA-graph captured with the collective inside.
A chunk is min(num_tokens, capacity) rows per destination; a batch of T tokens runs in ceil(T / capacity)
chunks. Every EP rank must call with the same T: the coordinator's pad_to guarantees it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from runtime.config import ConfigError
from runtime.expert_stats import ExpertStats
from runtime.parallel import ParallelState

_ALIGN = 16  # bytes; rows of the packed send buffer start aligned for any dtype view


class All2AllBackend(ABC):
    """An ExpertDispatcher (models/moe.py): dispatch -> local experts -> combine."""

    def __init__(self, parallel: ParallelState, num_experts: int, capacity: int,
                 stats: ExpertStats | None = None) -> None:
        if num_experts % parallel.ep_size:
            raise ConfigError(f"{num_experts} experts are not divisible by the expert-parallel size "
                              f"{parallel.ep_size}")
        if capacity <= 0:
            raise ConfigError(f"--expert-token-capacity must be positive, got {capacity}")
        self.parallel = parallel
        self.ep_size = parallel.ep_size
        self.num_experts = num_experts
        self.num_local_experts = num_experts // parallel.ep_size
        self.first_local_expert = parallel.ep_rank * self.num_local_experts
        self.capacity = capacity
        self.stats = stats

    @abstractmethod
    def dispatch(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]: ...

    @abstractmethod
    def combine(self, out_recv: torch.Tensor, handle: Any) -> torch.Tensor: ...


_BACKENDS: dict[str, type[All2AllBackend]] = {}


def register(name: str) -> Callable[[type[All2AllBackend]], type[All2AllBackend]]:
    def wrap(cls: type[All2AllBackend]) -> type[All2AllBackend]:
        _BACKENDS[name] = cls
        return cls
    return wrap


def make_dispatcher(name: str, parallel: ParallelState, num_experts: int, capacity: int,
                    stats: ExpertStats | None = None) -> All2AllBackend:
    if name not in _BACKENDS:
        raise ConfigError(f"unknown all2all backend {name!r}; choose one of {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name](parallel, num_experts, capacity, stats)


def default_backend(parallel: ParallelState) -> str:
    return "all_to_all_single" if parallel.ep_size > 1 else "local"


def validate_capacity(capacity: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Start-up check: every decode batch must fit one chunk (one collective per layer, graph-capturable)."""
    if capacity <= 0:
        raise ConfigError(f"--expert-token-capacity must be positive, got {capacity}")
    if capacity < max_num_seqs:
        raise ConfigError(f"--expert-token-capacity {capacity} is below --max-num-seqs {max_num_seqs}: a decode "
                          f"step would need several all2all rounds per layer; raise it to >= {max_num_seqs}")
    return min(capacity, max_num_batched_tokens)


def default_capacity(max_num_seqs: int, max_num_batched_tokens: int) -> int:
    return min(max_num_batched_tokens, max(max_num_seqs, 1024))


@register("local")
class LocalDispatcher(All2AllBackend):
    """ep_size == 1: nothing moves; global ids are local ids. Keeps one code path in the MoE layer."""

    def dispatch(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        if self.stats is None:
            return hidden, topk_weights, topk_ids, None
        self.stats.record_routing(topk_ids)
        # filler rows of a padded or dummy step: id -1, so the experts skip them
        real = torch.arange(topk_ids.shape[0], device=topk_ids.device) < self.stats.num_real_tokens  # [T]
        return hidden, topk_weights, torch.where(real.unsqueeze(1), topk_ids, -1), None

    def combine(self, out_recv: torch.Tensor, handle: Any) -> torch.Tensor:
        return out_recv


@dataclass(frozen=True)
class _Handle:
    num_tokens: int  # T before chunk padding
    chunk: int  # rows per destination per chunk
    num_chunks: int
    dtype: torch.dtype


@register("all_to_all_single")
class AllToAllSingle(All2AllBackend):
    """Fixed-size blocks: rank r sends [ep, chunk, row] and receives the same; row = meta | hidden bytes."""

    def _layout(self, hidden_size: int, top_k: int, dtype: torch.dtype) -> tuple[int, int, int]:
        meta_bytes = 8 * top_k  # fp32 weights [k] then int32 local ids [k]
        hidden_bytes = hidden_size * dtype.itemsize
        row_bytes = math.ceil((meta_bytes + hidden_bytes) / _ALIGN) * _ALIGN
        return meta_bytes, hidden_bytes, row_bytes

    def _exchange(self, send: torch.Tensor, tokens_sent: torch.Tensor | None = None) -> torch.Tensor:
        recv = torch.empty_like(send)
        t0 = self.stats.time_start() if self.stats is not None else None
        dist.all_to_all_single(recv, send, group=self.parallel.ep_group)  # equal splits: dim 0 = ep ranks
        if self.stats is not None:
            self.stats.time_stop("all2all", t0)
            remote_bytes = send.numel() * send.element_size() * (self.ep_size - 1) // self.ep_size
            self.stats.record_exchange(tokens_sent, None, remote_bytes)
        return recv

    def dispatch(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        num_tokens, hidden_size = hidden.shape
        top_k = topk_ids.shape[1]
        ep, n_loc = self.ep_size, self.num_local_experts
        chunk = max(1, min(num_tokens, self.capacity))
        num_chunks = max(1, math.ceil(num_tokens / chunk))
        meta_bytes, hidden_bytes, row_bytes = self._layout(hidden_size, top_k, hidden.dtype)

        # destination rank and local id of every (token, slot); chunk padding goes nowhere (dest -1), and so
        # do a padded batch's filler rows when the stats know the real count: dummy rows cost no expert work
        ids = topk_ids.long()
        if self.stats is not None:
            real = torch.arange(num_tokens, device=hidden.device) < self.stats.num_real_tokens  # [T]
            ids = torch.where(real.unsqueeze(1), ids, -1)
        dest = torch.div(ids, n_loc, rounding_mode="floor")  # [T, k]
        local = (ids - dest * n_loc).to(torch.int32)
        ranks = torch.arange(ep, device=hidden.device).view(ep, 1, 1)
        on_dest = dest.unsqueeze(0) == ranks  # [ep, T, k]
        send_ids = torch.where(on_dest, local.unsqueeze(0), torch.full_like(local, -1).unsqueeze(0))
        send_w = torch.where(on_dest, topk_weights.float().unsqueeze(0), 0.0)  # [ep, T, k]
        wanted = None
        if self.stats is not None:
            self.stats.record_routing(topk_ids)
            wanted = on_dest.any(dim=2)  # [ep, T]: token t needs rank r
            wanted[self.parallel.ep_rank] = False

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
            recv = self._exchange(send, wanted[:, lo:hi].sum() if wanted is not None else None)
            # recv: [ep source ranks, chunk, row_bytes]
            weight_parts.append(recv[:, :, : 4 * top_k].view(torch.float32).reshape(ep * chunk, top_k))
            id_parts.append(recv[:, :, 4 * top_k : meta_bytes].view(torch.int32).reshape(ep * chunk, top_k))
            hidden_parts.append(recv[:, :, meta_bytes : meta_bytes + hidden_bytes].view(hidden.dtype)
                                .reshape(ep * chunk, hidden_size))
        ids_recv = torch.cat(id_parts)  # [num_chunks * ep * chunk, k]
        if self.stats is not None:
            received = (ids_recv.view(num_chunks, ep, chunk, top_k) >= 0).any(dim=3)
            received[:, self.parallel.ep_rank] = False
            self.stats.record_exchange(None, received.sum(), 0)
        handle = _Handle(num_tokens, chunk, num_chunks, hidden.dtype)
        return torch.cat(hidden_parts), torch.cat(weight_parts), ids_recv, handle

    def combine(self, out_recv: torch.Tensor, handle: _Handle) -> torch.Tensor:
        ep, chunk = self.ep_size, handle.chunk
        hidden_size = out_recv.shape[1]
        parts = []
        for c in range(handle.num_chunks):
            block = out_recv[c * ep * chunk : (c + 1) * ep * chunk].reshape(ep, chunk, hidden_size).contiguous()
            back = self._exchange(block)  # [ep expert ranks, chunk, H]: each rank's partial sum of my tokens
            parts.append(back.float().sum(dim=0))
        return torch.cat(parts)[: handle.num_tokens].to(handle.dtype)
