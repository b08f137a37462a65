"""Timing collectives across ranks (benchmarks/bench_all2all_dist.py): the slowest rank's time per rep, and plain
all_to_all_single transports of given sizes to hold an exchange against."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


class Timer:
    """Per rep: barrier (gloo, on the host), the parts in order, one interval each; a rep counts as its slowest
    rank's (every rank's intervals, MAX-reduced after the reps); returns the median microseconds per part."""

    def __init__(self, device: torch.device, cpu_group: Any, reps: int, warmup: int) -> None:
        self.cuda = device.type == "cuda"
        self.cpu_group, self.reps, self.warmup = cpu_group, reps, warmup

    def __call__(self, parts: list[Callable[[], Any]]) -> list[float]:
        for _ in range(self.warmup):
            for part in parts:
                part()
        times = torch.zeros(self.reps, len(parts), dtype=torch.float64)
        for i in range(self.reps):
            if self.cuda:
                torch.cuda.synchronize()
            dist.barrier(group=self.cpu_group)
            if self.cuda:
                events = [torch.cuda.Event(enable_timing=True) for _ in range(len(parts) + 1)]
                events[0].record()
                for part, end in zip(parts, events[1:]):
                    part()
                    end.record()
                events[-1].synchronize()
                times[i] = torch.tensor([a.elapsed_time(b) * 1e3 for a, b in zip(events, events[1:])])
            else:
                stamps = [time.perf_counter()]
                for part in parts:
                    part()
                    stamps.append(time.perf_counter())
                times[i] = torch.tensor([(b - a) * 1e6 for a, b in zip(stamps, stamps[1:])])
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return [statistics.median(times[:, j].tolist()) for j in range(len(parts))]


class Plain:
    """dist.all_to_all_single on uint8 buffers, the transport alone."""

    def __init__(self, group: Any, device: torch.device, world: int) -> None:
        self.group, self.device, self.world = group, device, world

    def even(self, remote_bytes: int) -> Callable[[], Any]:
        block = max(1, -(-remote_bytes // (self.world - 1)))  # bytes per destination, own block included
        send = torch.ones(self.world * block, dtype=torch.uint8, device=self.device)
        recv = torch.empty_like(send)
        return lambda: dist.all_to_all_single(recv, send, group=self.group)

    def uneven(self, send_bytes: list[int], recv_bytes: list[int]) -> Callable[[], Any]:
        send = torch.ones(max(1, sum(send_bytes)), dtype=torch.uint8, device=self.device)[: sum(send_bytes)]
        recv = torch.empty(sum(recv_bytes), dtype=torch.uint8, device=self.device)
        return lambda: dist.all_to_all_single(recv, send, output_split_sizes=recv_bytes,
                                              input_split_sizes=send_bytes, group=self.group)


def gbps(num_bytes: float, us: float | None) -> float | None:
    return num_bytes / (us * 1e3) if us else None
