"""Prometheus metrics of the control plane (DESIGN §8), on a per-app registry so
several apps can live in one process (tests, `llm-gateway dev`).

Labels stay bounded: routes are path templates, outcomes are fixed words."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.metrics import exposition

MICRO = 1_000_000
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "llmgw_cp_http_requests", "HTTP requests served.", ["route", "status"], registry=r
        )
        self.http_duration = Histogram(
            "llmgw_cp_http_request_duration_seconds",
            "HTTP request duration.",
            ["route"],
            registry=r,
        )
        self.chat_inits = Counter(
            "llmgw_cp_chat_inits", "POST /v1/chat/init outcomes.", ["outcome"], registry=r
        )
        self.credits_reserved = Counter(
            "llmgw_cp_credits_reserved", "Credits put on hold at init.", registry=r
        )
        self.credits_charged = Counter(
            "llmgw_cp_credits_charged", "Credits charged at settlement.", registry=r
        )
        self.credits_released = Counter(
            "llmgw_cp_credits_released", "Held credits released unused.", registry=r
        )
        self.holds_active = Gauge(
            "llmgw_cp_holds_active",
            "Active holds (reservations not yet settled), across all processes.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.webhooks = Counter(
            "llmgw_cp_webhooks", "Usage webhooks received, by outcome.", ["outcome"], registry=r
        )
        self.reconciliation_lag = Histogram(
            "llmgw_cp_reconciliation_lag_seconds",
            "Time from a stream's end (the event's ended_at) to its settlement.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
            registry=r,
        )
        # The labelled children of the two per-request metrics, by (route, status).
        # `labels()` validates and sorts its keywords and takes the metric's lock on
        # every call (~2.5 µs each, two a request, measured in a real process); the
        # key space is bounded (route templates by status codes), so keep them.
        self._served: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    def http_served(self, route: str, status: int, seconds: float) -> None:
        """One request answered: `route` is its path template, `status` its code."""
        children = self._served.get((route, status))
        if children is None:
            children = (
                self.http_requests.labels(route=route, status=str(status)),
                self.http_duration.labels(route=route),
            )
            self._served[(route, status)] = children
        requests, duration = children
        requests.inc()
        duration.observe(seconds)

    def reserved(self, micro: int) -> None:
        self.credits_reserved.inc(micro / MICRO)

    def released(self, micro: int | None) -> None:
        """A hold given back whole (`ledger.release_reservation`'s answer: None when
        it released nothing)."""
        if micro is not None:
            self.credits_released.inc(micro / MICRO)

    def settled(self, charged_micro: int, released_micro: int) -> None:
        self.credits_charged.inc(charged_micro / MICRO)
        self.credits_released.inc(released_micro / MICRO)

    def render(self) -> bytes:
        return exposition(self.registry)
