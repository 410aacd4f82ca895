"""Prometheus metrics of the server, in a registry of its own (several apps may share a process).

lmscale_requests_total{endpoint, status}        answered requests
lmscale_prompt_tokens_total, lmscale_generation_tokens_total
lmscale_time_to_first_token_seconds             histogram, from arrival to the first token
lmscale_inter_token_latency_seconds             histogram, between consecutive tokens
lmscale_queue_depth, lmscale_running_requests, lmscale_kv_blocks_used, lmscale_kv_blocks_total
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lmscale_requests", "Answered requests", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("lmscale_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter(
            "lmscale_generation_tokens", "Generated tokens", registry=r
        )
        self.ttft = Histogram(
            "lmscale_time_to_first_token_seconds", "Time to first token", registry=r,
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.itl = Histogram(
            "lmscale_inter_token_latency_seconds", "Time between tokens", registry=r,
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        gauges = {
            "queue_depth": "Requests waiting for a slot",
            "running_requests": "Requests in the running batch",
            "kv_blocks_used": "KV-cache blocks in use",
            "kv_blocks_total": "KV-cache blocks in the pool",
        }
        for name, text in gauges.items():
            gauge = Gauge(f"lmscale_{name}", text, registry=r)
            gauge.set_function(lambda name=name: float(engine_stats().get(name, 0)))

    def render(self) -> bytes:
        return generate_latest(self.registry)
