"""Routing-aware expert all2all ("sparse"): each token travels once to each EP rank that holds at least one
of its top-k experts, with that rank's local expert ids and weights only; combine brings back one weighted
partial sum per (token, rank), added up at the source.

Two modes, picked from the step's token count T alone (the same on every EP rank, so every rank issues
the same collectives even when one replays a CUDA graph and another runs a prefill eagerly):
- static, T <= static_max_tokens (the largest CUDA-graph batch, or --all2all-static-max-tokens; 0 when off):
  a block of C(T) slots per destination, one all_to_all_single with equal splits each way, no counts, no host
  sync, so it is captured inside the decode graphs. C(T) = capacity_slots(): the rows a destination gets on
  average under uniform routing plus headroom, times --all2all-capacity-factor (T when that saves under 10%);
  the wire bytes are C/T of allgather's. Empty slots carry expert id -1 and cost no expert work. A (token,
  rank) pair past the C slots is not sent: the sender sets the flag word that rows carry when C < T (4 bytes,
  padded to 16), so every rank learns in the same exchange whether any rank overflowed (all agree, no extra
  collective). After the step, outside any graph, the model runner asks overflowed(T) (one host read) and, if
  so, runs the whole step again eagerly under exact() (dynamic mode) on every rank, before anything is
  sampled; the step's KV writes are the same values into the same slots, so the re-run is exact. A factor of
  0 gives T slots: nothing can overflow. (A second fixed round for the overflow would need T - C more slots,
  i.e. allgather's bytes again, and a data-dependent one cannot be captured: NCCL's splits are host ints.)
- dynamic, larger T (prefill; every step when graphs are off) and every re-run: each rank's per-destination
  counts go to every rank (one all_reduce of a [P, P] matrix, capturable), one host read, then
  all_to_all_single with uneven splits moving exactly the rows needed, in rounds of at most `capacity` rows
  per (source, destination) pair. Every rank derives the same number of rounds from the same matrix; a step
  in which no rank routes anything (all dummy) moves no payload. That read is the only host sync of a dispatch
  + combine: one kernel (route_exact) lays out the send rows, round after round, before it, so the read sizes
  everything (each round is a contiguous run of the send and receive buffers), and combine replays the plan
  (kernels and collectives only; its traffic counters are added on the host). Eager EP prefills pay this per
  MoE layer: route, count all_reduce, read, pack, all2all per round, unpack; all2all per round, combine.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kernels import fp8 as fp8_kernels
from kernels.all2all import pack as pack_kernels
from kernels.all2all import route as route_kernels
from runtime.distributed.all2all import FP8_GROUP, All2AllBackend, allgather_bytes, row_layout


@dataclass(frozen=True)
class _Plan:
    """Where the rows of one dispatch went; combine runs it backwards."""

    slot_of: torch.Tensor  # [T, P] int64: row of (token, rank)'s partial sum in the returned buffer; N = none
    num_rows_sent: int  # N
    layer: int
    dtype: torch.dtype
    # dynamic mode only: per round (rows sent to each rank, rows received from each rank); the rounds are
    # consecutive runs of the send rows (and of the received rows), so combine needs nothing else
    rounds: list[tuple[list[int], list[int]]] | None = None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 per token and 128-channel group: ([T, H] fp8, [T, ceil(H / 128)] fp32 scales)."""
    quant = fp8_kernels.per_token_group_quant if x.is_cuda else fp8_kernels.per_token_group_quant_ref
    return quant(x.contiguous(), FP8_GROUP)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.repeat_interleave(FP8_GROUP, dim=1)[:, : q.shape[1]]).to(dtype)  # as unpack does


HEADROOM_SD = 4.0  # standard deviations of a destination's row count above its mean that the slots absorb
# slots that would save less than this fraction of the bytes are not worth the overflow check (one host read
# after the step, before sampling): such steps get T slots
MIN_SAVING = 0.1


def rank_hit_fraction(num_experts: int, num_ranks: int, top_k: int) -> float:
    """Chance that a token's k distinct experts, drawn uniformly, include one of a given rank's E/P experts:
    f = 1 - C(E - E/P, k) / C(E, k) (top-8 of 128 over 8 ranks: 0.66, i.e. 5.3 ranks per token)."""
    return 1.0 - math.comb(num_experts - num_experts // num_ranks, top_k) / math.comb(num_experts, top_k)


def capacity_slots(num_tokens: int, num_experts: int, num_ranks: int, top_k: int, factor: float) -> int:
    """Slots per destination of a static exchange of T rows. Under uniform routing the rows one source sends
    one destination are Binomial(T, f): mean T f, standard deviation sqrt(T f (1 - f)). The slots hold the mean
    plus HEADROOM_SD deviations (a 3e-5 tail per pair), times factor for skewed routers; at least 1, and T (no
    limit) when that would save less than MIN_SAVING of T. factor <= 0: T slots (nothing can overflow).
    Top-8 of 128 over 8 ranks (f = 0.67), factor 1.25: no limit (C/T would be 1.0 up to T = 64, 0.98 at 256, 0.94
    at 512; factor 1.0: 0.79 at 256, 0.75 at 512); top-8 of 256 over 32 ranks (f = 0.23): 0.55 at T = 64, 0.42 at
    256; top-2 of 8 over 8 ranks: 0.59 at 64, 0.45 at 256."""
    if factor <= 0 or num_tokens <= 1:
        return num_tokens
    f = rank_hit_fraction(num_experts, num_ranks, top_k)
    mean, sd = num_tokens * f, math.sqrt(num_tokens * f * (1.0 - f))
    slots = max(1, math.ceil(factor * (mean + HEADROOM_SD * sd)))
    return slots if slots <= (1.0 - MIN_SAVING) * num_tokens else num_tokens


class SparseBackend(All2AllBackend):
    def __init__(self, *args: Any, capacity_factor: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.capacity_factor = capacity_factor  # static mode: slots per destination (capacity_slots); 0 = T
        device = self.parallel.device
        # [1] int32: OR of every rank's overflow flag over the static exchanges since the last overflowed() read
        self._overflow = torch.zeros(1, dtype=torch.int32, device=device)
        self._limited_rows: set[int] = set()  # dispatch sizes whose static blocks hold fewer than T slots
        self._exact = False  # inside exact(): every exchange is dynamic (the re-run of an overflowed step)
        use_triton = device.type == "cuda"
        self._pack_kernel = pack_kernels.sparse_pack if use_triton else pack_kernels.sparse_pack_ref
        self._combine_kernel = pack_kernels.sparse_combine if use_triton else pack_kernels.sparse_combine_ref
        self._route_kernel = route_kernels.sparse_route if use_triton else route_kernels.sparse_route_ref
        self._unpack_kernel = pack_kernels.sparse_unpack if use_triton else pack_kernels.sparse_unpack_ref
        self._pairs_kernel = pack_kernels.exchange_pairs if use_triton else pack_kernels.exchange_pairs_ref
        self._route_exact_kernel = (route_kernels.sparse_route_exact if use_triton
                                    else route_kernels.sparse_route_exact_ref)

    def _is_static(self, num_tokens: int) -> bool:
        capturing = self.parallel.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing and (num_tokens > self.static_max_tokens or self._exact):
            raise RuntimeError(f"sparse all2all: a CUDA graph of {num_tokens} tokens is above static_max_tokens "
                               f"{self.static_max_tokens} or inside exact(); the dynamic mode reads counts on the host")
        return not self._exact and (num_tokens <= self.static_max_tokens or capturing)

    def slots(self, num_tokens: int, top_k: int) -> int:
        """Static mode: slots per destination for a dispatch of num_tokens rows."""
        return capacity_slots(num_tokens, self.num_experts, self.ep_size, top_k, self.capacity_factor)

    def _dispatch_rows(self, num_tokens: int) -> int:
        # under EP x TP each TP rank dispatches its 1/tp share of the step's rows (models/moe.py tp_token_slice)
        tp = self.parallel.tp_size
        return -(-num_tokens // tp) if tp > 1 else num_tokens

    def warm_local_kernels(self, hidden_size: int, top_k: int, dtype: torch.dtype) -> None:
        # the dynamic exchange's pack and unpack (rows without the flag word) on one row this rank sends itself: the
        # collective warmup's rows are padding and route nowhere, so its dynamic steps launch neither (0 rows);
        # without a static step (no CUDA graphs: --enforce-eager) they would first compile on a served step
        device, me = self.parallel.device, self.ep_rank
        ids = torch.full((1, top_k), -1, dtype=torch.int32, device=device)
        ids[0, 0] = me * self.num_local_experts  # this rank's first expert
        dest, local, _, pair_of, _ = self._route_exact_kernel(ids, self.num_local_experts, self.ep_size,
                                                              self.capacity, me)
        hidden = torch.zeros(1, hidden_size, dtype=dtype, device=device)
        send = self._pack(hidden, torch.ones(1, top_k, device=device), dest, local, pair_of[:1], None)
        self._unpack(send, top_k, hidden_size, dtype, False)

    def overflowed(self, num_tokens: int) -> bool:
        """After a forward of num_tokens rows (outside any graph): did a static exchange of it leave a (token,
        rank) pair unsent on any EP rank? Every rank gets the same answer (each saw every sender's flag), so all
        re-run together. One host read, only for sizes whose blocks hold fewer than T slots."""
        if self._exact or self._dispatch_rows(num_tokens) not in self._limited_rows:
            return False
        if not int(self._overflow.item()):
            return False
        self._overflow.zero_()
        if self.stats is not None:
            self.stats.rerun_step()
        return True

    @contextmanager
    def exact(self) -> Iterator[None]:
        """Scope of the re-run of an overflowed step: dynamic (exact rows) exchanges, whatever T."""
        self._exact = True
        try:
            yield
        finally:
            self._exact = False

    def _timed(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        t0 = self.stats.time_start() if self.stats is not None else None
        fn(*args, group=self.parallel.ep_group, **kwargs)
        if self.stats is not None:
            self.stats.time_stop("all2all", t0)

    def _count_matrix(self, matrix: torch.Tensor) -> list[list[int]]:
        # matrix: [P, P] int64, this rank's row = rows it sends each rank, zeros elsewhere -> every rank's rows,
        # [source][destination], on the host
        self._timed(dist.all_reduce, matrix)
        return matrix.tolist()  # the one host read of a dynamic dispatch (combine reuses its plan)

    def dispatch(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        num_tokens, hidden_size = hidden.shape
        top_k = topk_ids.shape[1]
        ep, me = self.ep_size, self.ep_rank
        static = self._is_static(num_tokens)
        cap = self.slots(num_tokens, top_k) if static else num_tokens
        limited = cap < num_tokens  # pairs past the slots possible: overflow flag, and a re-run may follow
        layer = self.stats.record_routing(topk_ids, checkpoint=limited) if self.stats is not None else 0
        flag = None  # [1] int32 this rank's overflow, carried by every row when the slots are limited
        if static:  # one kernel on the GPU: few launches matter inside a decode graph
            dest, local, slot_of, pair_of, counts = self._route_kernel(topk_ids, self.num_local_experts, ep, cap)
            num_rows = ep * cap
            if limited:
                self._limited_rows.add(num_tokens)
                overflow = (counts - cap).clamp(min=0).sum()  # pairs this rank could not send
                flag = (overflow > 0).to(torch.int32).view(1)
                if self.stats is not None:
                    self.stats.record_overflow(layer, overflow)
        else:  # one kernel lays the send rows out (in rounds) before the counts reach the host, so one read sizes all
            dest, local, slot_of, pair_of, counts = self._route_exact_kernel(topk_ids, self.num_local_experts, ep,
                                                                             self.capacity, me)
            matrix = self._count_matrix(counts)
            send_counts = matrix[me]
            num_rows = sum(send_counts)
            pair_of = pair_of[:num_rows]  # [N] (past N: unspecified)
        send = self._pack(hidden, topk_weights, dest, local, pair_of, flag)  # [N, row_bytes] uint8

        plan = _Plan(slot_of, num_rows, layer, hidden.dtype)
        row_bytes = send.shape[1]
        # a re-run's steps were counted once already by the pass that overflowed
        ag_dispatch = 0 if self._exact else allgather_bytes(num_tokens, hidden_size, top_k, hidden.dtype, ep)[0]
        if static:
            recv = torch.empty_like(send)
            self._timed(dist.all_to_all_single, recv, send)  # equal splits: [P blocks of C rows]
            if limited:  # every sender's flag (own block included): the same OR on every rank
                torch.maximum(self._overflow, self._flags_view(recv, top_k).amax().view(1), out=self._overflow)
            if self.stats is not None:  # (token, rank) pairs counted on the device, in one launch
                self._pairs_kernel(counts, self._ids_view(recv, top_k), cap, me, self.stats.pair_counters(layer))
                remote = (ep - 1) * cap * row_bytes
                self.stats.record_exchange(layer, None, None, remote, remote, ag_dispatch)
        else:
            recv, plan = self._exchange_rounds(send, matrix, plan)
            if self.stats is not None:  # host ints, added on the host: no upload, no launch
                recv_counts = [matrix[src][me] for src in range(ep)]
                sent_rows, recv_rows = sum(send_counts) - send_counts[me], sum(recv_counts) - recv_counts[me]
                self.stats.record_exchange_host(layer, sent_rows, recv_rows, sent_rows * row_bytes,
                                                recv_rows * row_bytes, ag_dispatch, 1 + len(plan.rounds or []))
        weights_recv, ids_recv, hidden_recv = self._unpack(recv, top_k, hidden_size, hidden.dtype, limited)
        return hidden_recv, weights_recv, ids_recv, plan

    def _pack(self, hidden: torch.Tensor, topk_weights: torch.Tensor, dest: torch.Tensor, local: torch.Tensor,
              pair_of: torch.Tensor, flag: torch.Tensor | None) -> torch.Tensor:
        hidden_size, top_k = hidden.shape[1], dest.shape[1]
        has_flag = flag is not None
        offset, row_bytes = row_layout(hidden_size, top_k, hidden.dtype, self.fp8_dispatch, has_flag)
        send = torch.empty(pair_of.shape[0], row_bytes, dtype=torch.uint8, device=hidden.device)
        out_scales = None
        if self.fp8_dispatch:  # the pack quantizes each row as it writes it (quantize_rows' arithmetic, no launch)
            out_scales = send[:, 8 * top_k + 4 * has_flag : offset].view(torch.float32)
            out_hidden = send[:, offset : offset + hidden_size].view(fp8_kernels.FP8_DTYPE)
        else:
            out_hidden = send[:, offset : offset + hidden_size * hidden.dtype.itemsize].view(hidden.dtype)
        self._pack_kernel(hidden.contiguous(), None, topk_weights.float().contiguous(), dest, local, pair_of,
                          self.ep_size, send[:, : 4 * top_k].view(torch.float32),
                          send[:, 4 * top_k : 8 * top_k].view(torch.int32), out_hidden, out_scales, flag,
                          self._flags_view(send, top_k) if has_flag else None)
        return send

    def _ids_view(self, recv: torch.Tensor, top_k: int) -> torch.Tensor:
        return recv[:, 4 * top_k : 8 * top_k].view(torch.int32)  # [M, k] local ids of the received rows

    def _flags_view(self, rows: torch.Tensor, top_k: int) -> torch.Tensor:
        return rows[:, 8 * top_k : 8 * top_k + 4].view(torch.int32).view(-1)  # [M] the senders' overflow flags

    def _unpack(self, recv: torch.Tensor, top_k: int, hidden_size: int, dtype: torch.dtype,
                has_flag: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Received rows -> contiguous (weights [M, k] fp32, local ids [M, k] int32, hidden [M, H] dtype)."""
        offset = row_layout(hidden_size, top_k, dtype, self.fp8_dispatch, has_flag)[0]
        if self.fp8_dispatch:
            hidden = recv[:, offset : offset + hidden_size].view(fp8_kernels.FP8_DTYPE)
            scales = recv[:, 8 * top_k + 4 * has_flag : offset].view(torch.float32)
        else:
            hidden, scales = recv[:, offset : offset + hidden_size * dtype.itemsize].view(dtype), None
        return self._unpack_kernel(recv[:, : 4 * top_k].view(torch.float32), self._ids_view(recv, top_k), hidden,
                                   scales, dtype, FP8_GROUP)

    def _exchange_rounds(self, send: torch.Tensor, matrix: list[list[int]],
                         plan: _Plan) -> tuple[torch.Tensor, _Plan]:
        """Dynamic payload exchange: uneven splits, at most `capacity` rows per pair per round. Round j moves
        rows [j C, (j + 1) C) of each pair: one contiguous run of the send rows (route_exact laid them out so),
        received into the next run of one buffer."""
        ep, me, cap = self.ep_size, self.ep_rank, self.capacity
        recv_counts = [matrix[src][me] for src in range(ep)]
        num_rounds = -(-max(max(row) for row in matrix) // cap)  # 0 when nobody routes anything
        rounds = [([min(cap, max(0, n - j * cap)) for n in matrix[me]],
                   [min(cap, max(0, n - j * cap)) for n in recv_counts]) for j in range(num_rounds)]
        recv = send.new_empty(sum(recv_counts), send.shape[1])
        sent = received = 0
        for sizes, recv_sizes in rounds:
            num_sent, num_received = sum(sizes), sum(recv_sizes)
            self._timed(dist.all_to_all_single, recv[received : received + num_received], send[sent : sent + num_sent],
                        output_split_sizes=recv_sizes, input_split_sizes=sizes)
            sent, received = sent + num_sent, received + num_received
        return recv, _Plan(plan.slot_of, plan.num_rows_sent, plan.layer, plan.dtype, rounds)

    def combine(self, out_recv: torch.Tensor, plan: _Plan) -> torch.Tensor:
        num_tokens, ep = plan.slot_of.shape
        hidden_size = out_recv.shape[1]
        out_recv = out_recv.to(plan.dtype).contiguous()
        # back: [N + 1, H], row i = the partial sum for send row i; row N (pairs that went nowhere) is zero for the
        # torch reference, never read by the Triton kernel (no launch for it there)
        back = out_recv.new_empty(plan.num_rows_sent + 1, hidden_size)
        if self._combine_kernel is not pack_kernels.sparse_combine:
            back[plan.num_rows_sent].zero_()
        row_bytes = hidden_size * out_recv.element_size()
        if plan.rounds is None:  # static: P blocks of C rows
            self._timed(dist.all_to_all_single, back[: plan.num_rows_sent], out_recv.contiguous())
            sent = received = (ep - 1) * (plan.num_rows_sent // ep) * row_bytes
            num_collectives = 1
        else:
            sent_rows = received_rows = 0
            for sizes, recv_sizes in plan.rounds:  # send back what came in, in the same rounds, straight into place
                num_sent, num_received = sum(sizes), sum(recv_sizes)
                self._timed(dist.all_to_all_single, back[sent_rows : sent_rows + num_sent],
                            out_recv[received_rows : received_rows + num_received], output_split_sizes=sizes,
                            input_split_sizes=recv_sizes)
                sent_rows, received_rows = sent_rows + num_sent, received_rows + num_received
            me = self.ep_rank
            sent = sum(sum(r[1]) - r[1][me] for r in plan.rounds) * row_bytes
            received = sum(sum(r[0]) - r[0][me] for r in plan.rounds) * row_bytes
            num_collectives = len(plan.rounds)
        if self.stats is not None:
            ag_combine = 0 if self._exact else allgather_bytes(num_tokens, hidden_size, 1, plan.dtype, ep)[1]
            record = self.stats.record_exchange if plan.rounds is None else self.stats.record_exchange_host
            record(plan.layer, None, None, sent, received, ag_combine, num_collectives)
        # each token's partial sums from every rank, added in rank order (deterministic, fp32)
        return self._combine_kernel(back, plan.slot_of, plan.num_rows_sent)
