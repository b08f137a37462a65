"""vLLM's Prometheus metric names beside ours, so dashboards built for vLLM (its Grafana board reads these)
work unchanged. Labels as vLLM sets them: model_name, and engine (the DP rank) on per-engine gauges."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# vLLM's buckets for the request latencies and token counts
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
         80.0, 160.0, 640.0, 2560.0)
_TPOT = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
        960.0, 1920.0, 7680.0)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineGauges(Collector):
    def __init__(self, model_name: str, cluster: Any) -> None:
        self.model_name = model_name
        self.cluster = cluster  # server.metrics._ClusterCollector: the coordinator's latest ClusterStats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.cluster.stats
        ranks = stats.ranks if stats is not None else []
        labels = ["model_name", "engine"]
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", "num_running"),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "num_waiting"),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv_usage"),
            ("vllm:gpu_cache_usage_perc", "GPU KV-cache usage (the older name).", "kv_usage"),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            for r in ranks:
                g.add_metric([self.model_name, str(r.rank)], float(getattr(r, value)))
            yield g
        for name, doc, value in (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", "prefix_cache_queries"),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", "prefix_cache_hits"),
        ):
            c = CounterMetricFamily(name, doc, labels=labels)
            for r in ranks:
                c.add_metric([self.model_name, str(r.rank)], float(getattr(r, value)))
            yield c


class VllmMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str, cluster: Any) -> None:
        r = registry
        self.model_name = model_name
        m = ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", m,
                                         registry=r)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", m,
                              buckets=_TTFT, registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.",
                              m, buckets=_TPOT, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", m,
                             buckets=_TPOT, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", m,
                             buckets=_E2E, registry=r)
        self.request_prompt = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", m,
                                        buckets=_TOKENS, registry=r)
        self.request_generation = Histogram("vllm:request_generation_tokens", "Number of generation tokens "
                                            "processed.", m, buckets=_TOKENS, registry=r)
        self.decode_time = Histogram("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase "
                                     "for request.", m, buckets=_E2E, registry=r)
        # the engine's durations (TokenDelta.queue_time / prefill_time), on vLLM's request latency buckets
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase "
                                    "for request.", m, buckets=_E2E, registry=r)
        self.prefill_time = Histogram("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL "
                                      "phase for request.", m, buckets=_E2E, registry=r)
        self.max_generation = Histogram("vllm:request_max_num_generation_tokens", "Histogram of maximum number of "
                                        "requested generation tokens.", m, buckets=_TOKENS, registry=r)
        r.register(_EngineGauges(model_name, cluster))
        for metric in (self.prompt_tokens, self.generation_tokens):
            metric.labels(model_name)  # present at 0 from the start, as vLLM's are

    def on_prompt(self, num_tokens: int) -> None:
        self.prompt_tokens.labels(self.model_name).inc(num_tokens)
        self.request_prompt.labels(self.model_name).observe(num_tokens)

    def on_request_done(self, arrival: float, first_token: float | None, end: float, num_tokens: int,
                        finish_reason: str | None, max_tokens: int | None = None, queue_time: float | None = None,
                        prefill_time: float | None = None) -> None:
        name = self.model_name
        if max_tokens is not None:
            self.max_generation.labels(name).observe(max_tokens)
        self.generation_tokens.labels(name).inc(num_tokens)
        if finish_reason in ("stop", "length", "abort"):
            self.success.labels(name, finish_reason).inc()
        self.request_generation.labels(name).observe(num_tokens)
        if queue_time is not None and prefill_time is not None:  # the engine's, from the first output
            self.queue_time.labels(name).observe(queue_time)
            self.prefill_time.labels(name).observe(prefill_time)
        if first_token is not None:
            self.ttft.labels(name).observe(first_token - arrival)
            self.e2e.labels(name).observe(end - arrival)
            self.decode_time.labels(name).observe(end - first_token)  # first to last token, as vLLM's
            if num_tokens > 1:
                gap = (end - first_token) / (num_tokens - 1)
                self.tpot.labels(name).observe(gap)
                self.itl.labels(name).observe(gap)
