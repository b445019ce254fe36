"""Prometheus metrics at /metrics, named and shaped like vLLM's (prefix `sparsed:`).

Request counters and latency histograms are updated as requests finish; the engine's gauges
(requests running / waiting, pattern-pool bytes, KV-pool usage) and its step count are read from the AsyncLLM's
latest snapshot at scrape time. Each server has its own registry, so several can share a process.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sparsed_engine.engine.async_llm import AsyncLLM
from sparsed_engine.outputs import RequestOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
                    320.0, 640.0, 1280.0)


class _EngineCollector:
    def __init__(self, llm: AsyncLLM, model_name: str):
        self.llm, self.model_name = llm, model_name

    def collect(self):
        stats = self.llm.stats
        pool = stats.get("mask_pool", {})
        kv = stats.get("kv_pool", {})
        kv_usage = kv["used_blocks"] / kv["total_blocks"] if kv.get("total_blocks") else 0.0
        for name, doc, value in (
                ("sparsed:num_requests_running", "Requests in the running batch.", stats["num_running"]),
                ("sparsed:num_requests_waiting", "Requests waiting for admission.", self.llm.num_waiting()),
                ("sparsed:mask_pool_used_bytes", "Pattern-pool bytes held by running requests.",
                 pool.get("used_bytes", 0)),
                ("sparsed:mask_pool_capacity_bytes", "Pattern-pool size in bytes.", pool.get("capacity_bytes", 0)),
                ("sparsed:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv_usage),
                ("sparsed:engine_healthy", "1 while the engine can run steps, 0 once it is dead.",
                 int(self.llm.is_healthy))):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model_name], value)
            yield g
        c = CounterMetricFamily("sparsed:denoising_steps", "Denoising steps the engine ran (one per batch).",
                                labels=["model_name"])
        c.add_metric([self.model_name], self.llm.num_steps)
        yield c


class ServerMetrics:
    def __init__(self, llm: AsyncLLM, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry
        self.success = Counter("sparsed:request_success", "Finished requests by finish reason.",
                               labels + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("sparsed:prompt_tokens", "Prompt tokens of finished requests.", labels, registry=r)
        self.generation_tokens = Counter("sparsed:generation_tokens", "Generated tokens kept in outputs.",
                                         labels, registry=r)
        self.ttft = Histogram("sparsed:time_to_first_token_seconds",
                              "Arrival to the first committed output token (or the finish).", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("sparsed:e2e_request_latency_seconds", "Arrival to finish.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(llm, model_name))

    def record(self, out: RequestOutput, ttft: float, e2e: float) -> None:
        m = self.model_name
        c = out.outputs[0]
        self.success.labels(m, c.finish_reason or "abort").inc()
        self.prompt_tokens.labels(m).inc(len(out.prompt_token_ids))
        self.generation_tokens.labels(m).inc(len(c.token_ids))
        self.ttft.labels(m).observe(ttft)
        self.e2e.labels(m).observe(e2e)

    def record_abort(self) -> None:
        """A request that ended without its final output (its client went away, or the engine died)."""
        self.success.labels(self.model_name, "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
