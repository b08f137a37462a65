"""Expert statistics of one rank, for people who study MoE parallelism.

- routed tokens per (MoE layer, expert): a [num_moe_layers, num_experts] int64 counter on the device, updated
  inside the forward (CUDA-graph safe: no host sync; padding and dummy rows arrive with expert id -1). Each
  layer's ids go into one step buffer (the fused router writes them there itself: routing_ids_out) and the last
  MoE layer counts them all, three launches a step: counting per layer took two launches per layer, 0.21 ms of
  a served 3.39 ms decode step at batch 1 on an H200 (Qwen3-30B-A3B, 48 MoE layers);
- all2all traffic: (token, remote rank) pairs and bytes sent / received, also device counters, and per MoE
  layer the bytes sent next to what the allgather backend would have sent (the routing-aware saving); the
  bytes include both passes of a step whose fixed-capacity exchange overflowed and was re-run, the
  allgather-equivalent counts each step once; the pairs that did not fit and the number of such re-runs;
- with timing on (eager steps only: graph replays run no Python), the step time split into attention /
  MoE compute / all2all / other, from module hooks and the dispatcher's collectives.
Everything is read once per stats interval (the only host sync) and travels as an ExpertStatsSnapshot.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from runtime.messages import ExpertStatsSnapshot

PARTS = ("attention", "moe_compute", "all2all", "other")
TRAFFIC = ("tokens_sent", "tokens_received", "bytes_sent", "bytes_received", "num_collectives", "overflow_pairs",
           "allgather_bytes")  # the columns of ExpertStats' per-layer all2all counters


def _capturing(device: torch.device) -> bool:
    """Inside a CUDA-graph capture on the current stream: what is launched there runs only when the graph replays."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _Clock:
    """Intervals on the host (CPU) or with CUDA events resolved lazily at read time (no per-step sync)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[str, Any, Any]] = []
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.seconds["moe"] = 0.0  # whole MoE blocks, all2all included
        self.seconds["total"] = 0.0

    def now(self) -> Any:
        if self.cuda:
            if torch.cuda.is_current_stream_capturing():
                return None
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, part: str, start: Any) -> None:
        if start is None:
            return
        end = self.now()
        if self.cuda:
            self.pending.append((part, start, end))
        else:
            self.seconds[part] += end - start

    def resolve(self) -> None:
        for part, start, end in self.pending:
            end.synchronize()
            self.seconds[part] += start.elapsed_time(end) / 1e3
        self.pending.clear()


class ExpertStats:
    def __init__(self, num_moe_layers: int, num_experts: int, device: torch.device, timed: bool = False,
                 max_tokens: int = 0) -> None:
        self.num_moe_layers = num_moe_layers
        self.num_experts = num_experts
        self.device = device
        # one spare column past the experts takes the padding rows' counts (their id -1 lands there): record_routing
        # is then one remainder and one index_add per MoE layer, two launches where the graph of a served decode
        # step had five (48 MoE layers: 144 launches fewer per step)
        self._routed = torch.zeros(max(num_moe_layers, 1), max(num_experts, 1) + 1, dtype=torch.int64, device=device)
        self.routed_tokens = self._routed[:, :-1]  # [num_moe_layers, num_experts], a view
        self._one = torch.ones(1, dtype=torch.int64, device=device)  # expanded to every (token, slot) added
        # one step's ids [num_moe_layers, max_tokens, top_k] int32, allocated at the first routing (top_k is the
        # model's); a step of more tokens (or max_tokens 0) counts per layer as before
        self.max_tokens = max_tokens
        self._step_ids: torch.Tensor | None = None
        self._layer_offsets = torch.arange(max(num_moe_layers, 1), device=device).view(-1, 1, 1) * self._routed.shape[1]
        # all2all traffic per MoE layer, int64 [num_moe_layers, 7]: TRAFFIC's columns. Tokens are (token, remote
        # rank) pairs, bytes those that left / reached this rank (a rank's copy to itself excluded); overflow_pairs:
        # (token, rank) pairs past a static exchange's slots (the step was re-run); allgather_bytes: what the
        # allgather backend would have sent for the same steps. One row add per exchange (the host-int part as a
        # cached device row inside a CUDA graph): 2-3 launches per MoE layer where 2 per counter took ~30
        self._traffic = torch.zeros(max(num_moe_layers, 1), len(TRAFFIC), dtype=torch.int64, device=device)
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}  # host-int rows made on the device, by value
        # the same columns for exchanges known only on the host and never in a graph (the sparse backend's dynamic
        # mode): plain ints, added to the device counters when read
        self._host_traffic = [[0] * len(TRAFFIC) for _ in range(max(num_moe_layers, 1))]
        # routed_tokens before the current step, kept while a step may still be re-run (its first pass's
        # routing is then taken back: the re-run counts the step's real routing)
        self.routed_before = torch.zeros_like(self.routed_tokens)
        self.num_overflow_reruns = 0  # steps re-run because a fixed-capacity exchange overflowed
        self._layer_cursor = 0  # MoE layers are dispatched in order, once each per forward
        self.merge: Any = None  # counters -> their sum over the engine's TP ranks (set under EP x TP)
        self.num_forward_steps = 0
        self.timed = timed
        self.clock = _Clock(device)
        self._step_timed = False
        self._hooks: list[Any] = []

    # ---- inside the forward (called by the all2all backend) ----
    def _ids_buffer(self, num_tokens: int, top_k: int) -> torch.Tensor | None:
        """The step buffer if a step of num_tokens fits it (allocated on first use, never during a capture)."""
        if self._step_ids is None:
            if self.max_tokens <= 0 or (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                return None
            self._step_ids = torch.full((max(self.num_moe_layers, 1), self.max_tokens, top_k), -1, dtype=torch.int32,
                                        device=self.device)
        buf = self._step_ids
        return buf if num_tokens <= buf.shape[1] and top_k == buf.shape[2] else None

    def routing_ids_out(self, num_tokens: int, top_k: int) -> torch.Tensor | None:
        """Where the router of the next MoE layer may write its [num_tokens, top_k] int32 ids (then record_routing
        moves nothing), or None."""
        buf = self._ids_buffer(num_tokens, top_k)
        return buf[self._layer_cursor, :num_tokens] if buf is not None else None

    def record_routing(self, topk_ids: torch.Tensor, checkpoint: bool = False) -> int:
        """Counts (token, expert) pairs; returns the MoE layer index for record_exchange. checkpoint: this step
        may be re-run (rerun_step), so its first MoE layer keeps a copy of the counts (a device copy: graph-safe)."""
        # topk_ids: [T, k] global expert ids of this rank's tokens, -1 on padding rows (the MoE layer masks them)
        layer = self._layer_cursor
        if checkpoint and layer == 0:
            self.routed_before.copy_(self.routed_tokens)
        num_tokens, top_k = topk_ids.shape
        width = self._routed.shape[1]  # -1 (padding) % (E + 1) = E: the spare column; int32 ids index as they are
        buf = self._ids_buffer(num_tokens, top_k)
        if buf is None:  # one layer at a time
            ids = topk_ids.reshape(-1)
            self._routed[layer].index_add_(0, ids.remainder(width), self._one.expand(ids.shape[0]))
        else:
            mine = buf[layer, :num_tokens]
            if mine.data_ptr() != topk_ids.data_ptr():  # not written there by the router (torch path, large T)
                mine.copy_(topk_ids)
            if layer == self.num_moe_layers - 1 or self.num_moe_layers == 0:  # every layer of the step at once
                flat = (buf[:, :num_tokens].remainder(width) + self._layer_offsets).reshape(-1)
                self._routed.view(-1).index_add_(0, flat, self._one.expand(flat.shape[0]))
        self._layer_cursor = (layer + 1) % max(self.num_moe_layers, 1)
        return layer

    def _all_traffic(self) -> torch.Tensor:
        """[num_moe_layers, len(TRAFFIC)]: the device counters plus the host-side ones (one upload per read)."""
        return self._traffic + torch.tensor(self._host_traffic, dtype=torch.int64).to(self.device)

    @property
    def all2all(self) -> torch.Tensor:
        """[tokens_sent, tokens_received, bytes_sent, bytes_received, num_collectives, overflow_pairs], all layers."""
        return self._all_traffic()[:, :6].sum(0)

    @property
    def layer_traffic(self) -> torch.Tensor:
        """Per MoE layer: [bytes sent, bytes the allgather backend would have sent, (token, remote rank) pairs sent]."""
        return self._all_traffic()[:, [2, 6, 0]]

    def _host_row(self, values: tuple[int, ...]) -> torch.Tensor:
        """A [len(TRAFFIC)] int64 device row of host ints. Inside a CUDA graph the capture bakes in a persistent
        row (made earlier by the eager warm-up of the same size), else a row of its own made by fills; outside, a
        fresh one."""
        row = self._rows.get(values)
        if row is not None:
            return row
        if _capturing(self.device):  # no host-to-device copy inside a capture
            # the zeros and fills are captured, not run: the row holds its values only once this graph has replayed
            # (before: undefined memory). Cached, an eager step or another graph with the same values (a dummy
            # step's warm-up and graph of this size, an eager prefill of as many tokens) would add whatever is
            # there; uncached, it is this graph's temporary, filled before its add on every replay
            row = torch.zeros(len(values), dtype=torch.int64, device=self.device)
            for i, v in enumerate(values):
                if v:
                    row[i].fill_(v)
            return row
        # one small host-to-device copy, from pinned memory: a pageable one (torch.tensor(..., device=cuda)) waits for
        # the stream, i.e. for the all2all just launched, in every eager exchange of new values (the dynamic mode)
        cuda = self.device.type == "cuda"
        row = torch.tensor(values, dtype=torch.int64, pin_memory=cuda).to(self.device, non_blocking=cuda)
        if len(self._rows) < 256:  # (the dynamic mode's values vary step to step: keep only what graphs need)
            self._rows[values] = row
        return row

    def record_exchange(self, layer: int, tokens_sent: torch.Tensor | int | None,
                        tokens_received: torch.Tensor | int | None, bytes_sent: int, bytes_received: int,
                        allgather_bytes: int, num_collectives: int = 1) -> None:
        """One exchange of an MoE layer: tokens as device scalars (static exchanges: counted on the device) or host
        ints; bytes and collectives are host ints (a CUDA graph replays the same ones: its shapes are fixed)."""
        device_tokens = [t if isinstance(t, torch.Tensor) else None for t in (tokens_sent, tokens_received)]
        host_tokens = [int(t) if t is not None and d is None else 0 for t, d in zip((tokens_sent, tokens_received),
                                                                                 device_tokens)]
        values = (*host_tokens, bytes_sent, bytes_received, num_collectives, 0, allgather_bytes)
        if any(values):
            self._traffic[layer].add_(self._host_row(values))
        if device_tokens[0] is not None and device_tokens[1] is not None:
            self._traffic[layer, :2].add_(torch.stack(device_tokens))
        else:
            for i, t in enumerate(device_tokens):
                if t is not None:
                    self._traffic[layer, i].add_(t)

    def record_exchange_host(self, layer: int, tokens_sent: int | None, tokens_received: int | None, bytes_sent: int,
                             bytes_received: int, allgather_bytes: int, num_collectives: int = 1) -> None:
        """record_exchange for an eager exchange whose numbers are all host ints (the sparse backend's dynamic mode,
        never captured): added on the host, no upload and no launch (a device row per new set of values was an
        upload and an add per dispatch and per combine of every MoE layer)."""
        row = self._host_traffic[layer]
        for i, v in enumerate((tokens_sent or 0, tokens_received or 0, bytes_sent, bytes_received, num_collectives, 0,
                               allgather_bytes)):
            row[i] += v

    def pair_counters(self, layer: int) -> torch.Tensor:
        """[2] int64 view of a layer's (token, remote rank) pairs sent and received, for a kernel to add into."""
        return self._traffic[layer, :2]

    def record_overflow(self, layer: int, num_pairs: torch.Tensor) -> None:
        self._traffic[layer, 5].add_(num_pairs)

    def rerun_step(self) -> None:
        """The step just run overflowed a static exchange and runs again: take back its routing counts."""
        self.routed_tokens.copy_(self.routed_before)
        self.num_overflow_reruns += 1

    def time_start(self) -> Any:
        return self.clock.now() if self.timed else None

    def time_stop(self, part: str, start: Any) -> None:
        if self.timed and start is not None:
            self.clock.add(part, start)
            self._step_timed = True

    # ---- around each step (called by the engine loop, outside any graph) ----
    def begin_step(self) -> Any:
        self._layer_cursor = 0
        self._step_timed = False
        return self.clock.now() if self.timed else None

    def end_step(self, start: Any) -> None:
        self.num_forward_steps += 1
        if self.timed and self._step_timed:
            self.clock.add("total", start)

    def attach_timers(self, model: nn.Module) -> None:
        """Module hooks time attention blocks and whole MoE blocks (eager forwards only)."""
        if not self.timed:
            return
        for module in model.modules():
            part = "moe" if getattr(module, "is_moe", False) else (
                "attention" if type(module).__name__.endswith("Attention") else None)
            if part is None:
                continue
            self._hooks.append(module.register_forward_pre_hook(self._pre_hook))
            self._hooks.append(module.register_forward_hook(self._post_hook(part)))

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        module._stats_t0 = self.time_start()  # type: ignore[assignment]

    def _post_hook(self, part: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.time_stop(part, getattr(module, "_stats_t0", None))
        return hook

    # ---- read (once per stats interval: the only host sync) ----
    def time_split(self) -> dict[str, float]:
        if not self.timed:
            return {}
        self.clock.resolve()
        s = self.clock.seconds
        a2a = s["all2all"]
        return {"attention": s["attention"], "moe_compute": max(s["moe"] - a2a, 0.0), "all2all": a2a,
                "other": max(s["total"] - s["attention"] - s["moe"], 0.0), "total": s["total"]}

    def counters(self) -> torch.Tensor:
        """Every counter in one int64 host tensor: routed tokens [num_moe_layers * E], per-layer traffic
        [num_moe_layers * 3], then all2all [6]."""
        n = self.num_moe_layers
        return torch.cat([self.routed_tokens[:n].flatten(), self.layer_traffic[:n].flatten(), self.all2all]).cpu()

    def snapshot(self, rank: int) -> ExpertStatsSnapshot:
        counters = self.counters()
        if self.merge is not None:  # EP x TP: this engine's TP ranks each routed and sent a slice of its tokens
            counters = self.merge(counters)
        n, e = self.num_moe_layers, self.routed_tokens.shape[1]
        routed = counters[: n * e].view(n, e)
        layer_bytes = counters[n * e : n * e + 3 * n].view(n, 3).tolist()
        a2a = counters[-6:].tolist()
        return ExpertStatsSnapshot(
            rank=rank, routed_tokens=routed.tolist(),
            all2all_tokens_sent=a2a[0], all2all_tokens_received=a2a[1], all2all_bytes_sent=a2a[2],
            all2all_bytes_received=a2a[3], num_forward_steps=self.num_forward_steps, time_split=self.time_split(),
            all2all_layer_bytes_sent=[b[0] for b in layer_bytes],
            all2all_layer_allgather_bytes=[b[1] for b in layer_bytes],
            # every TP rank of an engine re-runs the same steps: the engine's count is this rank's
            all2all_overflow_pairs=a2a[5], all2all_overflow_reruns=self.num_overflow_reruns,
        )
