"""Kernel timing from CUDA-graph replays, for the tuners: one graph holds each call once, so a small kernel's
time is its GPU time, not the host's launch latency (do_bench's eager loop reads ~40 us for every small call)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def time_graph_us(calls: list[Callable[[], object]], rep_ms: float, max_reps: int = 200,
                  device: str = "cuda") -> float:
    """Median microseconds per call over replays of one CUDA graph holding each of `calls` once; with device
    "cpu" (the tuners' interpreter smoke tests) one eager pass's wall time."""
    if device == "cpu":
        t0 = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t0) * 1e6 / len(calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles, allocates (a graph captures no first launch)
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    est_ms = (time.perf_counter() - t0) * 1e3
    n = max(3, min(max_reps, int(rep_ms / max(est_ms, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    del graph
    return times[len(times) // 2] * 1e3 / len(calls)
