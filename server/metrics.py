"""Prometheus metrics of the front end (its own registry: no globals, so tests can build several)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from runtime.messages import ClusterStats
from server.vllm_metrics import VllmMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
_TPOT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)


class _ClusterCollector(Collector):
    """Per-rank gauges from the coordinator's latest ClusterStats, and throughputs computed from the change of the
    ranks' cumulative token counts over a sliding window of about rate_window seconds. The counts move in steps (a
    rank reports them with its heartbeat, about once a second) while ClusterStats arrive every second: a window as
    short as the push period would read 0 or twice the rate. Until rate_window has passed, the window is what there
    is (from 0.5 s on); every rank has a gauge (0) from its first snapshot."""

    def __init__(self, rate_window: float = 5.0) -> None:
        self.rate_window = rate_window
        self.stats: ClusterStats | None = None
        self._snapshots: deque[tuple[float, dict[int, tuple[int, int]]]] = deque()
        self.prompt_tps: dict[int, float] = {}
        self.generation_tps: dict[int, float] = {}

    def update(self, stats: ClusterStats, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        counts = {r.rank: (r.prompt_tokens, r.generation_tokens) for r in stats.ranks}
        # the window starts at the newest snapshot at least rate_window old (older ones are dropped)
        while len(self._snapshots) > 1 and now - self._snapshots[1][0] >= self.rate_window:
            self._snapshots.popleft()
        for rank, (p, g) in counts.items():
            self.prompt_tps.setdefault(rank, 0.0)
            self.generation_tps.setdefault(rank, 0.0)
            # the oldest snapshot that has this rank (a rank that joined later has a shorter window)
            then, (p0, g0) = next(((t, c[rank]) for t, c in self._snapshots if rank in c), (now, (p, g)))
            if now - then >= 0.5:
                self.prompt_tps[rank] = max(p - p0, 0) / (now - then)
                self.generation_tps[rank] = max(g - g0, 0) / (now - then)
        self._snapshots.append((now, counts))
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.stats
        ranks = stats.ranks if stats is not None else []

        def gauge(
            name: str,
            doc: str,
            per_rank: dict[int, float],
            total: float | None = None,
        ) -> Iterator[GaugeMetricFamily]:
            g = GaugeMetricFamily(f"moe_{name}", doc, labels=["rank"])
            for rank, value in sorted(per_rank.items()):
                g.add_metric([str(rank)], value)
            yield g
            if total is not None:
                yield GaugeMetricFamily(f"moe_cluster_{name}", doc + " (all ranks)", value=total)

        running = {r.rank: float(r.num_running) for r in ranks}
        waiting = {r.rank: float(r.num_waiting) for r in ranks}
        kv = {r.rank: r.kv_usage for r in ranks}
        yield from gauge("num_requests_running", "requests running on the rank", running, sum(running.values()))
        yield from gauge("num_requests_waiting", "requests waiting on the rank", waiting, sum(waiting.values()))
        # the cluster figure is the fullest rank: that is the one that starts preempting first
        yield from gauge(
            "kv_cache_usage_ratio",
            "fraction of the rank's KV blocks in use (cluster: max)",
            kv,
            max(kv.values(), default=0.0),
        )
        yield from gauge(
            "prompt_throughput_tokens_per_second",
            "prompt tokens/s over the last stats interval",
            self.prompt_tps,
            sum(self.prompt_tps.values()),
        )
        yield from gauge(
            "generation_throughput_tokens_per_second",
            "generated tokens/s over the last stats interval",
            self.generation_tps,
            sum(self.generation_tps.values()),
        )
        for name, attr, doc in (
            ("engine_steps", "num_steps", "steps the rank ran"),
            ("engine_dummy_steps", "num_dummy_steps", "dummy (collectives only) steps"),
            ("engine_prompt_tokens", "prompt_tokens", "prompt tokens the rank computed"),
            ("engine_generation_tokens", "generation_tokens", "tokens the rank generated"),
            ("prefix_cache_queries", "prefix_cache_queries", "prefix cache lookups, tokens"),
            ("prefix_cache_hits", "prefix_cache_hits", "prefix cache hits, tokens"),
        ):
            c = CounterMetricFamily(f"moe_{name}", doc, labels=["rank"])
            for r in ranks:
                c.add_metric([str(r.rank)], float(getattr(r, attr)))
            yield c
        for name, values, doc in (
            ("all2all_bytes_sent", getattr(stats, "all2all_bytes_sent", None),
             "expert all2all bytes the rank sent to other ranks (dispatch + combine)"),
            ("all2all_allgather_equivalent_bytes", getattr(stats, "all2all_allgather_bytes", None),
             "bytes the allgather backend would have sent for the same steps"),
            ("all2all_overflow_reruns", getattr(stats, "all2all_overflow_reruns", None),
             "steps re-run exactly because a fixed-capacity (CUDA-graph) all2all overflowed its slots"),
        ):
            c = CounterMetricFamily(f"moe_{name}", doc, labels=["rank"])
            for rank, num in enumerate(values or []):
                c.add_metric([str(rank)], float(num))
            yield c
        routed = CounterMetricFamily(
            "moe_requests_routed", "requests the coordinator sent to the rank", labels=["rank"]
        )
        for rank, num in enumerate(getattr(stats, "num_requests_routed", None) or []):
            routed.add_metric([str(rank)], float(num))
        yield routed
        yield CounterMetricFamily(
            "moe_engine_restarts", "engine rank group restarts", value=float(stats.num_engine_restarts if stats else 0)
        )
        yield GaugeMetricFamily(
            "moe_engine_healthy",
            "1 while every engine rank answers",
            value=1.0 if stats is None or stats.healthy else 0.0,
        )


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.model_name = model_name
        self.requests = Counter(
            "moe_http_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.finished = Counter(
            "moe_request_finished", "engine requests by finish reason", ["finish_reason"], registry=r
        )
        self.client_disconnects = Counter(
            "moe_client_disconnects", "non-streamed requests whose client went away before the answer", registry=r
        )
        self.prompt_tokens = Counter("moe_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("moe_generation_tokens", "tokens sent back to clients", registry=r)
        self.ttft = Histogram(
            "moe_time_to_first_token_seconds", "arrival to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "moe_time_per_output_token_seconds",
            "mean gap between a request's tokens",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "moe_e2e_request_latency_seconds", "arrival to last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.cluster = _ClusterCollector()
        r.register(self.cluster)
        self.vllm = VllmMetrics(r, model_name, self.cluster)

    def track_client(self, client: Any) -> None:
        """Front-end queue figures, read from the EngineClient at scrape time."""

        class _FrontEnd(Collector):
            def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
                yield GaugeMetricFamily(
                    "moe_frontend_requests_in_flight",
                    "engine requests the front end waits on",
                    value=len(client.in_flight),
                )
                yield GaugeMetricFamily(
                    "moe_frontend_requests_queued",
                    "admitted engine requests with no output yet (bounded by --max-queue-len)",
                    value=client.num_waiting_first_token,
                )
                yield CounterMetricFamily(
                    "moe_requests_resubmitted", "requests re-sent after an engine restart", value=client.num_resubmitted
                )
                yield CounterMetricFamily(
                    "moe_stale_outputs_dropped",
                    "output batches of a dead engine incarnation, ignored",
                    value=getattr(client, "num_stale_outputs", 0),
                )

        self.registry.register(_FrontEnd())

    def on_request_done(
        self, arrival: float, first_token: float | None, end: float, num_tokens: int, finish_reason: str | None,
        max_tokens: int | None = None, queue_time: float | None = None, prefill_time: float | None = None,
    ) -> None:
        self.finished.labels(finish_reason or "abort").inc()
        self.vllm.on_request_done(arrival, first_token, end, num_tokens, finish_reason, max_tokens, queue_time,
                                  prefill_time)
        self.generation_tokens.inc(num_tokens)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            self.e2e.observe(end - arrival)
            if num_tokens > 1:
                self.tpot.observe((end - first_token) / (num_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
