"""Routing-aware expert all2all ("sparse"): each token travels once to each EP rank that holds at least one
of its top-k experts, with that rank's local expert ids and weights only; combine brings back one weighted
partial sum per (token, rank), added up at the source.

Two modes, picked from the step's token count T alone (the same on every EP rank, so every rank issues
the same collectives even when one replays a CUDA graph and another runs a prefill eagerly):
- static, T <= static_max_tokens (the largest CUDA-graph batch; 0 when graphs are off): a block of T slots
  per destination, one all_to_all_single with equal splits each way, no counts, no host sync, so it is
  captured inside the decode graphs. T slots can never overflow: a token goes at most once to each rank.
  Empty slots carry expert id -1 and cost no expert work, but fixed splits move the whole block, so on the
  wire this mode costs what allgather costs (FP8 dispatch halves it).
- dynamic, larger T (prefill; every step when graphs are off): each rank's per-destination counts go to
  every rank (one all_reduce of a [P, P] matrix, capturable), one host read, then all_to_all_single with
  uneven splits moving exactly the rows needed, in rounds of at most `capacity` rows per (source,
  destination) pair. Every rank derives the same number of rounds from the same matrix; a step in which no
  rank routes anything (all dummy) moves no payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kernels import all2all_pack as pack_kernels
from kernels import fp8 as fp8_kernels
from runtime.distributed.all2all import FP8_GROUP, All2AllBackend, allgather_bytes, row_layout


@dataclass(frozen=True)
class _Plan:
    """Where the rows of one dispatch went; combine runs it backwards."""

    slot_of: torch.Tensor  # [T, P] int64: row of (token, rank)'s partial sum in the returned buffer; N = none
    num_rows_sent: int  # N
    layer: int
    dtype: torch.dtype
    # dynamic mode only: per round (rows sent to each rank, rows received from each rank), and for several
    # rounds the send-buffer rows of each round in order ([N] int64 on the device)
    rounds: list[tuple[list[int], list[int]]] | None = None
    send_order: torch.Tensor | None = None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 per token and 128-channel group: ([T, H] fp8, [T, ceil(H / 128)] fp32 scales)."""
    quant = fp8_kernels.per_token_group_quant if x.is_cuda else fp8_kernels.per_token_group_quant_ref
    return quant(x.contiguous(), FP8_GROUP)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.repeat_interleave(FP8_GROUP, dim=1)[:, : q.shape[1]]).to(dtype)  # as unpack does


class SparseBackend(All2AllBackend):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        use_triton = self.parallel.device.type == "cuda"
        self._pack_kernel = pack_kernels.sparse_pack if use_triton else pack_kernels.sparse_pack_ref
        self._combine_kernel = pack_kernels.sparse_combine if use_triton else pack_kernels.sparse_combine_ref
        self._route_kernel = pack_kernels.sparse_route if use_triton else pack_kernels.sparse_route_ref
        self._unpack_kernel = pack_kernels.sparse_unpack if use_triton else pack_kernels.sparse_unpack_ref

    def _is_static(self, num_tokens: int) -> bool:
        capturing = self.parallel.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing and num_tokens > self.static_max_tokens:
            raise RuntimeError(f"sparse all2all: a CUDA graph of {num_tokens} tokens is above static_max_tokens "
                               f"{self.static_max_tokens}; the dynamic mode reads counts on the host")
        return num_tokens <= self.static_max_tokens or capturing

    def _timed(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        t0 = self.stats.time_start() if self.stats is not None else None
        fn(*args, group=self.parallel.ep_group, **kwargs)
        if self.stats is not None:
            self.stats.time_stop("all2all", t0)

    def _count_matrix(self, counts: torch.Tensor) -> list[list[int]]:
        # counts: [P] rows this rank sends to each rank -> [P, P] on every rank, [source][destination]
        matrix = torch.zeros(self.ep_size, self.ep_size, dtype=torch.int64, device=counts.device)
        matrix[self.ep_rank] = counts
        self._timed(dist.all_reduce, matrix)
        return matrix.tolist()  # the one host read of a dynamic step

    def dispatch(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        num_tokens, hidden_size = hidden.shape
        top_k = topk_ids.shape[1]
        ep, me, device = self.ep_size, self.ep_rank, hidden.device
        layer = self.record_routing(topk_ids)
        static = self._is_static(num_tokens)
        if static:  # one kernel on the GPU: few launches matter inside a decode graph
            dest, local, slot_of, pair_of, counts = self._route_kernel(topk_ids, self.num_local_experts, ep)
            num_rows = ep * num_tokens
        else:
            dest, local = self.place(topk_ids)  # [T, k]
            # hit[t, r]: token t needs rank r; pos[t, r]: its slot among the tokens this rank sends to r
            hit = torch.zeros(num_tokens, ep + 1, dtype=torch.bool, device=device)
            hit.scatter_(1, dest.masked_fill(dest < 0, ep), True)
            hit = hit[:, :ep]
            matrix = self._count_matrix(hit.sum(0))
            send_counts = matrix[me]
            num_rows = sum(send_counts)
            base = torch.tensor([0, *send_counts[:-1]], device=device).cumsum(0)
            slot_of = torch.where(hit, base + hit.long().cumsum(0) - 1, num_rows)  # [T, P], N = no slot
            # inverse map: send row -> (token, rank) pair t * P + r; pairs that go nowhere all land on row N
            pair_of = torch.full((num_rows + 1,), num_tokens * ep, dtype=torch.int64, device=device)
            pair_of.scatter_(0, slot_of.reshape(-1), torch.arange(num_tokens * ep, device=device))
            pair_of = pair_of[:num_rows]
        send = self._pack(hidden, topk_weights, dest, local, pair_of)  # [N, row_bytes] uint8

        plan = _Plan(slot_of, num_rows, layer, hidden.dtype)
        row_bytes = send.shape[1]
        ag_dispatch = allgather_bytes(num_tokens, hidden_size, top_k, hidden.dtype, ep)[0]
        if static:
            recv = torch.empty_like(send)
            self._timed(dist.all_to_all_single, recv, send)  # equal splits: [P blocks of T rows]
            if self.stats is not None:
                got = (self._ids_view(recv, top_k).view(ep, num_tokens, top_k) >= 0).any(dim=2)  # [P, T]
                got[me] = False
                remote = (ep - 1) * num_tokens * row_bytes
                self.stats.record_exchange(layer, counts.sum() - counts[me], got.sum(), remote, remote, ag_dispatch)
        else:
            recv, plan = self._exchange_rounds(send, matrix, plan)
            if self.stats is not None:
                recv_counts = [matrix[src][me] for src in range(ep)]
                sent_rows, recv_rows = sum(send_counts) - send_counts[me], sum(recv_counts) - recv_counts[me]
                self.stats.record_exchange(layer, sent_rows, recv_rows, sent_rows * row_bytes,
                                           recv_rows * row_bytes, ag_dispatch, 1 + len(plan.rounds or []))
        weights_recv, ids_recv, hidden_recv = self._unpack(recv, top_k, hidden_size, hidden.dtype)
        return hidden_recv, weights_recv, ids_recv, plan

    def _pack(self, hidden: torch.Tensor, topk_weights: torch.Tensor, dest: torch.Tensor, local: torch.Tensor,
              pair_of: torch.Tensor) -> torch.Tensor:
        hidden_size, top_k = hidden.shape[1], dest.shape[1]
        offset, row_bytes = row_layout(hidden_size, top_k, hidden.dtype, self.fp8_dispatch)
        send = torch.empty(pair_of.shape[0], row_bytes, dtype=torch.uint8, device=hidden.device)
        scales = out_scales = None
        if self.fp8_dispatch:
            q, scales = quantize_rows(hidden)
            hidden = q.view(torch.uint8)
            out_scales = send[:, 8 * top_k : offset].view(torch.float32)
        out_hidden = send[:, offset : offset + hidden_size * hidden.dtype.itemsize].view(hidden.dtype)
        self._pack_kernel(hidden.contiguous(), scales, topk_weights.float().contiguous(), dest, local, pair_of,
                          self.ep_size, send[:, : 4 * top_k].view(torch.float32),
                          send[:, 4 * top_k : 8 * top_k].view(torch.int32), out_hidden, out_scales)
        return send

    def _ids_view(self, recv: torch.Tensor, top_k: int) -> torch.Tensor:
        return recv[:, 4 * top_k : 8 * top_k].view(torch.int32)  # [M, k] local ids of the received rows

    def _unpack(self, recv: torch.Tensor, top_k: int, hidden_size: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Received rows -> contiguous (weights [M, k] fp32, local ids [M, k] int32, hidden [M, H] dtype)."""
        offset = row_layout(hidden_size, top_k, dtype, self.fp8_dispatch)[0]
        if self.fp8_dispatch:
            hidden = recv[:, offset : offset + hidden_size].view(fp8_kernels.FP8_DTYPE)
            scales = recv[:, 8 * top_k : offset].view(torch.float32)
        else:
            hidden, scales = recv[:, offset : offset + hidden_size * dtype.itemsize].view(dtype), None
        return self._unpack_kernel(recv[:, : 4 * top_k].view(torch.float32), self._ids_view(recv, top_k), hidden,
                                   scales, dtype, FP8_GROUP)

    def _exchange_rounds(self, send: torch.Tensor, matrix: list[list[int]],
                         plan: _Plan) -> tuple[torch.Tensor, _Plan]:
        """Dynamic payload exchange: uneven splits, at most `capacity` rows per pair per round."""
        ep, me, cap = self.ep_size, self.ep_rank, self.capacity
        send_counts = matrix[me]
        recv_counts = [matrix[src][me] for src in range(ep)]
        num_rounds = -(-max(max(row) for row in matrix) // cap)  # 0 when nobody routes anything
        rounds, order, parts = [], [], []
        starts = [sum(send_counts[:r]) for r in range(ep)]
        for j in range(num_rounds):
            sizes = [min(cap, max(0, n - j * cap)) for n in send_counts]
            recv_sizes = [min(cap, max(0, n - j * cap)) for n in recv_counts]
            rounds.append((sizes, recv_sizes))
            chunk = send
            if num_rounds > 1:  # round j: rows [j * cap, j * cap + size) of every destination's run
                rows = [i for r in range(ep) for i in range(starts[r] + j * cap, starts[r] + j * cap + sizes[r])]
                order += rows
                chunk = send[torch.tensor(rows, dtype=torch.int64, device=send.device)]
            recv = send.new_empty(sum(recv_sizes), send.shape[1])
            self._timed(dist.all_to_all_single, recv, chunk, output_split_sizes=recv_sizes,
                        input_split_sizes=sizes)
            parts.append(recv)
        recv = torch.cat(parts) if parts else send.new_empty(0, send.shape[1])
        send_order = torch.tensor(order, dtype=torch.int64, device=send.device) if num_rounds > 1 else None
        return recv, _Plan(plan.slot_of, plan.num_rows_sent, plan.layer, plan.dtype, rounds, send_order)

    def combine(self, out_recv: torch.Tensor, plan: _Plan) -> torch.Tensor:
        num_tokens, ep = plan.slot_of.shape
        hidden_size = out_recv.shape[1]
        out_recv = out_recv.to(plan.dtype)
        # back: [N + 1, H], row i = the partial sum for send row i; row N stays zero (pairs that went nowhere)
        back = out_recv.new_zeros(plan.num_rows_sent + 1, hidden_size)
        row_bytes = hidden_size * out_recv.element_size()
        if plan.rounds is None:
            self._timed(dist.all_to_all_single, back[: plan.num_rows_sent], out_recv.contiguous())
            sent = received = (ep - 1) * num_tokens * row_bytes
            num_collectives = 1
        else:
            parts, lo = [], 0
            for sizes, recv_sizes in plan.rounds:  # send back what came in, in the same rounds
                # one round: the rows come back in send order, straight into place
                part = back[: plan.num_rows_sent] if plan.send_order is None else out_recv.new_empty(sum(sizes),
                                                                                                    hidden_size)
                self._timed(dist.all_to_all_single, part, out_recv[lo : lo + sum(recv_sizes)].contiguous(),
                            output_split_sizes=sizes, input_split_sizes=recv_sizes)
                parts.append(part)
                lo += sum(recv_sizes)
            if plan.send_order is not None:
                back[plan.send_order] = torch.cat(parts)
            me = self.ep_rank
            sent = sum(sum(r[1]) - r[1][me] for r in plan.rounds) * row_bytes
            received = sum(sum(r[0]) - r[0][me] for r in plan.rounds) * row_bytes
            num_collectives = len(plan.rounds)
        if self.stats is not None:
            ag_combine = allgather_bytes(num_tokens, hidden_size, 1, plan.dtype, ep)[1]
            self.stats.record_exchange(plan.layer, None, None, sent, received, ag_combine, num_collectives)
        # each token's partial sums from every rank, added in rank order (deterministic, fp32)
        return self._combine_kernel(back, plan.slot_of, plan.num_rows_sent)
