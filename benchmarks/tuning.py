"""What the kernel tuners share: timing from CUDA-graph replays (one graph holds each call once, so a small
kernel's time is its GPU time, not the host's launch latency: do_bench's eager loop reads ~40 us for every small
call), and compiling the candidates first in parallel processes (Triton's disk cache keeps the binaries)."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Sequence

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


def precompile(items: Sequence, worker: Callable[[list], str], jobs: int) -> None:
    """worker(chunk) -> a short status, run over `jobs` interleaved chunks of items in spawned processes (worker
    must be a module-level function: it is pickled by name)."""
    t0 = time.time()
    chunks = [list(items[i::jobs]) for i in range(jobs) if items[i::jobs]]
    with mp.get_context("spawn").Pool(len(chunks)) as pool:
        done = pool.map(worker, chunks)
    print(f"precompiled {len(items)} variants in {time.time() - t0:.0f} s ({', '.join(done)})", flush=True)


class Budget:
    """A tuner's time budget: left(what) is False once it is spent, and remembers what was skipped."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.time() + seconds
        self.skipped: list[str] = []

    def left(self, what: str) -> bool:
        if time.time() < self.deadline:
            return True
        self.skipped.append(what)
        return False


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def sweep(configs: Sequence[dict], run: Callable[[dict], torch.Tensor], ref: torch.Tensor,
          time_us: Callable[[dict], float], tol: float, budget: Budget, what: str,
          device: str = "cuda") -> tuple[list[dict], dict | None]:
    """Each config that the budget allows: its output run(cfg) checked against ref (also the eager warm-up call), then
    time_us(cfg) if within tol. A config that fails to compile or launch (out of shared memory / registers) is
    skipped with a line. Returns the rows [{cfg, us, err}] and the fastest row (None if none was timed)."""
    rows = []
    for cfg in configs:
        if not budget.left(f"{what} {cfg}"):
            continue
        try:
            err = rel_err(run(cfg), ref)
            us = time_us(cfg) if err < tol else float("inf")
        except Exception as exc:  # noqa: BLE001
            if device == "cuda":
                torch.cuda.synchronize()
            us, err = float("inf"), float("nan")
            print(f"    skip {cfg}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
        rows.append({"cfg": cfg, "us": us, "err": err})
    timed = [r for r in rows if r["us"] < float("inf")]
    return rows, (min(timed, key=lambda r: r["us"]) if timed else None)
