"""Prometheus metrics of the server, in a registry of its own (several apps may share a process).

lmscale_requests_total{endpoint, status}        answered requests
lmscale_prompt_tokens_total, lmscale_generation_tokens_total
lmscale_time_to_first_token_seconds             histogram, from arrival to the first token
lmscale_inter_token_latency_seconds             histogram, between consecutive tokens
lmscale_queue_depth, lmscale_running_requests, lmscale_kv_blocks_used, lmscale_kv_blocks_total
lmscale_prefix_cache_queries_total              tokens of admitted requests, looked up in the
                                                prefix cache (a resumed preempted request again)
lmscale_prefix_cache_hits_total                 of those, tokens found cached (not computed)
lmscale_prefix_cache_hit_rate                   hits / queries since the start (0 before any)
lmscale_decode_compiled                         1 once the compiled decode step's graphs are
                                                ready (0 while they compile, or with --eager)
lmscale_replicas                                engine replicas answering (1 in one process)
lmscale_max_num_seqs, lmscale_token_budget      the batch's bounds: requests, tokens per step
lmscale_batch_occupancy                         running requests / max_num_seqs
lmscale_engine_steps_total, lmscale_step_tokens_total
                                                steps run and tokens they computed (their rates'
                                                ratio over the token budget: the steps' fill)
lmscale_gpu_memory_allocated_bytes, lmscale_gpu_memory_reserved_bytes
                                                CUDA memory in tensors / held by torch (0 on CPU)
process_cpu_seconds_total, process_resident_memory_bytes, ...
                                                the server process (prometheus_client's own)
lmscale_probe_loss, lmscale_probe_perplexity    the probe text's (--probe) mean loss in nats, and
                                                exp of it, at its latest scoring
lmscale_probe_timestamp_seconds, lmscale_probe_runs_total
lmscale_prompt_loss                             mean per-token loss of the latest scored prompts
lmscale_prompt_loss_nats_total, lmscale_prompt_loss_tokens_total
                                                every scored prompt token's loss, and the tokens
lmscale_model_info{model, adapter}              1, labelled with what is served now
lmscale_model_loaded_timestamp_seconds          when it was put into service
lmscale_reloads_total{result}                   reloads done ("ok") and refused ("refused")
lmscale_engines_draining                        replaced engines still finishing their requests
lmscale_replica_*{replica}                      behind Ray Serve, each live replica's own:
                                                running_requests, queue_depth, kv_blocks_used,
                                                kv_blocks_total, generation_tokens_total

Behind Ray Serve (`lmscale serve --replicas/--autoscale`) the engine's numbers are sums over the
live replicas (`decode_compiled`: 1 once every live replica's graphs are ready), and the counters
keep what replicas that have since stopped had counted, so they never go down.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class _EngineCounters(Collector):
    """Totals the engine keeps itself, read at each scrape and exported as counters."""

    COUNTERS = {
        "prefix_cache_queries": "Tokens looked up in the prefix cache as requests were admitted",
        "prefix_cache_hits": "Tokens found in the prefix cache instead of computed",
        "engine_steps": "Engine steps run",
        "step_tokens": "Tokens computed by engine steps (prefilled plus decoded)",
        "probe_runs": "Complete scorings of the probe text",
        "prompt_loss_nats": "Summed next-token loss of the scored prompt tokens, in nats",
        "prompt_loss_tokens": "Prompt tokens scored for the prompt-loss gauge",
    }

    def __init__(self, engine_stats: Callable[[], dict[str, int]]):
        self.engine_stats = engine_stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.engine_stats()
        for name, text in self.COUNTERS.items():
            yield CounterMetricFamily(f"lmscale_{name}", text, value=stats.get(name, 0))
        # The quality gauges exist once there is a value: a scrape before the first scoring
        # has no series, rather than a made-up number.
        probe = stats.get("probe_loss")
        if probe is not None:
            yield GaugeMetricFamily(
                "lmscale_probe_loss", "Mean per-token loss of the probe text, nats", value=probe
            )
            yield GaugeMetricFamily(
                "lmscale_probe_perplexity", "Perplexity of the probe text", value=math.exp(probe)
            )
            yield GaugeMetricFamily(
                "lmscale_probe_timestamp_seconds", "When the probe was last scored",
                value=stats["probe_timestamp"],
            )  # fmt: skip
        recent = stats.get("recent_prompt_loss")
        if recent is not None:
            yield GaugeMetricFamily(
                "lmscale_prompt_loss", "Mean per-token loss of the latest scored prompts, nats",
                value=recent,
            )  # fmt: skip


class _Served(Collector):
    """What is served, since when, and the reloads (from an `EngineSwitch`)."""

    def __init__(self, switch):
        self.switch = switch

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.switch
        info = GaugeMetricFamily(
            "lmscale_model_info", "What is served now", labels=["model", "adapter"]
        )
        info.add_metric([s.source.model, s.source.adapter or ""], 1)
        yield info
        yield GaugeMetricFamily(
            "lmscale_model_loaded_timestamp_seconds", "When the served weights were put into "
            "service", value=s.loaded_at,
        )  # fmt: skip
        reloads = CounterMetricFamily("lmscale_reloads", "Reloads by result", labels=["result"])
        for result, count in s.reloads.items():
            reloads.add_metric([result], count)
        yield reloads
        yield GaugeMetricFamily(
            "lmscale_engines_draining", "Replaced engines still finishing requests",
            value=s.draining(),
        )  # fmt: skip


class _PerReplica(Collector):
    """Each live replica's numbers, labelled by its Ray Serve replica id."""

    GAUGES = {
        "running_requests": ("num_running", "Requests in the replica's running batch"),
        "queue_depth": ("num_waiting", "Requests waiting in the replica's engine"),
        "kv_blocks_used": ("kv_blocks_used", "KV-cache blocks in use in the replica"),
        "kv_blocks_total": ("kv_blocks_total", "KV-cache blocks in the replica's pool"),
    }

    def __init__(self, per_replica: Callable[[], dict[str, dict[str, int]]]):
        self.per_replica = per_replica

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        replicas = self.per_replica()
        for name, (field, text) in self.GAUGES.items():
            family = GaugeMetricFamily(f"lmscale_replica_{name}", text, labels=["replica"])
            for replica, stats in replicas.items():
                family.add_metric([replica], stats.get(field, 0))
            yield family
        tokens = CounterMetricFamily(
            "lmscale_replica_generation_tokens", "Tokens the replica generated", labels=["replica"]
        )
        for replica, stats in replicas.items():
            tokens.add_metric([replica], stats.get("generation_tokens_total", 0))
        yield tokens


def _occupancy(stats: dict) -> float:
    most = stats.get("max_num_seqs", 0)
    return stats.get("running_requests", 0) / most if most else 0.0


def hit_rate(stats: dict[str, int]) -> float:
    """Prefix-cache hits over queries, 0 before any query."""
    queries = stats.get("prefix_cache_queries", 0)
    return stats.get("prefix_cache_hits", 0) / queries if queries else 0.0


class ServerMetrics:
    """The server's metrics (see the module docstring).

    Args:
        engine_stats: the engine's current numbers by name, without the `lmscale_` prefix.
        per_replica: each replica's `EngineStats` fields by replica id (behind Ray Serve).
        switch: the `EngineSwitch` serving (for what is served and its reloads), if any.
    """

    def __init__(
        self, engine_stats: Callable[[], dict[str, int]],
        per_replica: Callable[[], dict[str, dict[str, int]]] | None = None, switch=None,
    ):  # fmt: skip
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
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
            "decode_compiled": "1 once the compiled decode step's graphs are all ready",
            "replicas": "Engine replicas answering",
            "max_num_seqs": "The most requests the running batch may hold",
            "token_budget": "The most tokens one engine step may compute",
            "gpu_memory_allocated_bytes": "CUDA memory in tensors (0 without CUDA)",
            "gpu_memory_reserved_bytes": "CUDA memory held by torch's allocator (0 without CUDA)",
        }
        for name, text in gauges.items():
            gauge = Gauge(f"lmscale_{name}", text, registry=r)
            gauge.set_function(lambda name=name: float(engine_stats().get(name, 0)))
        rate = Gauge(
            "lmscale_prefix_cache_hit_rate", "Prefix-cache hits over queries, in tokens", registry=r
        )
        rate.set_function(lambda: hit_rate(engine_stats()))
        occupancy = Gauge(
            "lmscale_batch_occupancy", "Running requests over max_num_seqs", registry=r
        )
        occupancy.set_function(lambda: _occupancy(engine_stats()))
        r.register(_EngineCounters(engine_stats))
        if switch is not None:
            r.register(_Served(switch))
        if per_replica is not None:
            r.register(_PerReplica(per_replica))

    def render(self) -> bytes:
        return generate_latest(self.registry)
