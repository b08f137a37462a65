"""benchmarks/bench_e2e.py device_timeline: a decode step's device time read off a profile, on a real trace (one
H200, Qwen3-30B-A3B bf16 at B=1, 6 steps: benchmarks/results/session14_h200, RESULTS.md session 14)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from benchmarks.bench_e2e import device_timeline

TRACE = Path(__file__).resolve().parent.parent / "benchmarks/results/session14_h200/call6_e2e_gaps_trace_b1.json.gz"


def device_spans() -> list[tuple[float, float, str]]:
    events = json.loads(gzip.decompress(TRACE.read_bytes()))["traceEvents"]
    return [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
            if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def test_a_decode_step_read_off_its_trace() -> None:
    spans = device_spans()
    t = device_timeline(spans, 6)
    assert t is not None
    # 5 whole steps after the first: the graph's 434 kernels and 13 ops around it, 2.69 ms (the bench's 2.67-2.70)
    assert t["kernels_per_step"] == 447
    assert 2.6 < t["device_span_ms"] < 2.8 and t["device_busy_ms"] <= t["device_span_ms"]
    kernels = {k["name"][:20]: k for k in t["kernels"]}
    assert kernels["_gemv_up_kernel"]["per_step"] == 48  # one a layer
    # with PDL a kernel's duration overlaps its predecessor's: what it adds is less (the down GEMV's weights are
    # prefetched before its wait: 19.5 us long, ~6 us added)
    down = kernels["_gemv_down_kernel"]
    assert down["adds_us"] < 0.5 * down["lasts_us"]
    # the LM head (outside the graph, 622 MB at 4.24 TB/s: 147 us) adds what it lasts
    head = max(t["kernels"], key=lambda k: k["adds_us"])
    assert head["per_step"] == 1 and 135 < head["adds_us"] < 150
    # the steady state has no long idle gap (the first step's slow graph launch, ~80 us, is not counted); the most
    # idle time is 48 short ones a step, before each cuBLAS projection (no PDL there: it waits for the norm's end)
    assert max(g["us_per_step"] / g["per_step"] for g in t["idle_gaps"]) < 10
    assert t["idle_gaps"][0]["per_step"] == 48 and "nvjet" in t["idle_gaps"][0]["between"]
    assert device_timeline(spans, 1) is None and device_timeline([], 6) is None


def test_the_adds_sum_to_the_span() -> None:
    spans = [(0.0, 10.0, "a"), (8.0, 12.0, "DtoH"), (12.5, 20.0, "b"), (15.0, 18.0, "c"), (19.0, 25.0, "d"),
             (25.0, 26.0, "DtoH"), (30.0, 40.0, "b"), (38.0, 41.0, "DtoH")]
    t = device_timeline(spans, 3)  # the first step (to the first DtoH's end, 12) is dropped: 2 steps from 12.5
    assert t["kernels_per_step"] == 3
    assert abs(t["device_span_ms"] * 1e3 - (41.0 - 12.5) / 2) < 1e-9
    assert abs(sum(k["adds_us_per_step"] for k in t["kernels"]) - (41.0 - 12.5) / 2) < 1e-9
    adds = {k["name"]: k["adds_us"] for k in t["kernels"]}
    assert adds["c"] == 0.0 and adds["d"] == 5.0  # c ends inside b; d past b's 20
    assert abs(t["device_busy_ms"] * 1e3 - (26.0 - 12.5 + 11.0) / 2) < 1e-9  # idle 26..30
    assert t["idle_gaps"][0]["between"] == "DtoH -> b"
