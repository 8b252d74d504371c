"""The edge's Prometheus metrics (DESIGN §8), in a registry owned by one app.

A per-app registry (not the library's global one) lets several apps live in one
process — `llm-gateway dev` and the tests do. Label values are bounded.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Time to first token spans a local mock (ms) to a slow reasoning model (tens of s).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
RELAY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1)


class EdgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.streams_active = Gauge(
            "llmgw_edge_streams_active", "Streams being relayed now.", registry=r
        )
        self.streams_total = Counter(
            "llmgw_edge_streams", "Streams ended, by status.", ["status"], registry=r
        )
        self.ttft = Histogram(
            "llmgw_edge_time_to_first_token_seconds",
            "Request accepted to first content token written.",
            ["model", "provider"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "llmgw_edge_stream_duration_seconds",
            "Whole stream duration.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.relay_delay = Histogram(
            "llmgw_edge_relay_delay_seconds",
            "Upstream chunk received to written to the client.",
            buckets=RELAY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "llmgw_edge_tokens", "Tokens billed, by direction.", ["direction"], registry=r
        )
        self.token_rejections = Counter(
            "llmgw_edge_token_rejections",
            "Stream tokens refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "llmgw_edge_upstream_errors", "Backend failures.", ["provider", "kind"], registry=r
        )
        self.webhook_deliveries = Counter(
            "llmgw_edge_webhook_deliveries",
            "Usage webhook delivery attempts.",
            ["outcome"],
            registry=r,
        )
        self.outbox_pending = Gauge(
            "llmgw_edge_outbox_pending", "Usage events not yet delivered.", registry=r
        )
