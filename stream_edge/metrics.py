"""The edge's Prometheus metrics (DESIGN §8), in a registry owned by one app.

A per-app registry (not the library's global one) lets several apps live in one
process — `llm-gateway dev` and the tests do. With several uvicorn workers the
samples go to prometheus-client's multiprocess files instead and `/metrics` merges
them (`shared.metrics`); the gauges' ``multiprocess_mode`` says how.

Label values are bounded: `status`, `direction`, `reason`, `kind` and `outcome` are
fixed words from the code; `model` and `provider` are the ids of the edge's own
catalog (packaged, or the operator's `LLMGW_MODELS_FILE`), never the client's nor a
company's: a company names its own models and providers, and as label values those
names would let one tenant mint unbounded series (issue 11.16). They show as
``custom`` (`model_label`, `provider_label`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.catalog import Catalog

CUSTOM = "custom"


def model_label(catalog: Catalog, model_id: str) -> str:
    return model_id if model_id in catalog.models else CUSTOM


def provider_label(catalog: Catalog, provider: str) -> str:
    return provider if provider in catalog.providers else CUSTOM


# Request accepted → first content token: a local mock answers in milliseconds, a
# hosted chat model in 0.3 to 3 s, a reasoning model in tens of seconds. Finer between
# 0.5 and 5 s, where the p95 alert's threshold sits.
TTFT_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75,
    1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30,
)  # fmt: skip
# Whole streams: a short answer takes well under a second, the longest is cut at
# LLMGW_MAX_STREAM_SECONDS (default 900).
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900)
# Chunk received → handed to the client's socket: tens of microseconds when the
# client keeps up; seconds when its buffer is full and the edge waits on it (cut at
# LLMGW_SLOW_CLIENT_TIMEOUT_SECONDS, default 10).
RELAY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 1, 2.5, 10,
)  # fmt: skip


class EdgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.streams_active = Gauge(
            "llmgw_edge_streams_active",
            "Streams connected to a backend and not yet reported.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.streams_total = Counter(
            "llmgw_edge_streams",
            "Streams ended, by webhook status (completed, cancelled, failed).",
            ["status"],
            registry=r,
        )
        self.ttft = Histogram(
            "llmgw_edge_time_to_first_token_seconds",
            "Request accepted by the edge to the first content token from the backend.",
            ["model", "provider"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "llmgw_edge_stream_duration_seconds",
            "Request accepted to usage reported, for every stream that reached a backend.",
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
            "llmgw_edge_tokens",
            "Tokens reported for billing, by direction (input, output).",
            ["direction"],
            registry=r,
        )
        self.token_rejections = Counter(
            "llmgw_edge_token_rejections",
            "Stream tokens refused before any backend call, by reason.",
            ["reason"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "llmgw_edge_upstream_errors",
            "Backend failures, before or during a stream, by provider and error code.",
            ["provider", "kind"],
            registry=r,
        )
        # Key pools and fallback chains (issue 16): `key` is a platform key's id
        # (`shared.key_pool.key_id`, never the key) or `custom` for a company's.
        self.key_events = Counter(
            "llmgw_edge_upstream_key_events",
            "Backend keys rate limited (rested, or not when one company's request was limited "
            "by every key) or refused (marked bad), by provider and key id.",
            ["provider", "key", "event"],
            registry=r,
        )
        self.fallbacks = Counter(
            "llmgw_edge_fallbacks",
            "Streams moved to the next model of their chain before the first byte.",
            ["from_model", "to_model"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "llmgw_edge_webhook_deliveries",
            "Usage webhook delivery attempts, by outcome (delivered, retry, rejected).",
            ["outcome"],
            registry=r,
        )
        self.outbox_pending = Gauge(
            "llmgw_edge_outbox_pending",
            "Usage events in the shared outbox not yet delivered (the same on every edge).",
            registry=r,
            # Each worker re-reads the shared size every second; `inc` stays allowed.
            multiprocess_mode="livemax",
        )
