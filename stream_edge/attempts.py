"""One model of a stream's chain (issue 16.2): the request as it goes to that model,
the backend it puts the stream on, and the call that carries it (pure: no I/O)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.catalog import ModelSpec, Provider
from shared.tokens import StreamGrant
from stream_edge.admission import Route
from stream_edge.meter import Meter
from stream_edge.metrics import EdgeMetrics, model_label, provider_label
from stream_edge.settings import EdgeSettings
from stream_edge.upstream import adapter_for
from stream_edge.upstream.base import Adapter, CallerContext, UpstreamCall


@dataclass(frozen=True, slots=True)
class Attempt:
    """One model of the stream's chain, with the request as it goes to it."""

    route: Route
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    max_tokens: int
    input_estimate: int


@dataclass(slots=True)  # not frozen: built per stream, and a frozen init costs ~1 µs
class Backend:
    """The attempt a stream is on: the one that serves, or the last one tried. A
    fallback gets a fresh one (and so a fresh meter: only what serves is billed)."""

    attempt: Attempt
    adapter: Adapter | None  # None: the edge cannot speak the provider's format
    meter: Meter
    # Bounded metric labels: a company's own model and provider names are `custom`.
    model_label: str
    provider_label: str
    # The key and service token the backend was last sent: kept out of what its
    # errors log (`upstream.base.vendor_failure`).
    credentials: tuple[str, ...] = ()

    @classmethod
    def of(cls, attempt: Attempt, settings: EdgeSettings) -> Backend:
        provider = attempt.route.provider
        catalog = settings.catalog
        return cls(
            attempt,
            adapter_for(provider),
            Meter(
                input_estimate=attempt.input_estimate,
                keep_transcript=settings.store_transcripts,
                delta_is_token=provider.api_type == "openai_chat",
            ),
            model_label(catalog, attempt.route.model.id),
            provider_label(catalog, provider.name),
        )

    @property
    def model(self) -> ModelSpec:
        return self.attempt.route.model

    @property
    def provider(self) -> Provider:
        return self.attempt.route.provider

    def observe_first_token(self, metrics: EdgeMetrics, accepted_at: float) -> None:
        """Time to first token, from the request's arrival at the edge."""
        metrics.ttft.labels(self.model_label, self.provider_label).observe(
            time.perf_counter() - accepted_at
        )


def upstream_call(
    attempt: Attempt,
    grant: StreamGrant,
    settings: EdgeSettings,
    *,
    stream: bool,
    key: str | None,
    thought_signatures: Mapping[str, str] | None = None,
) -> UpstreamCall:
    """What goes to the attempt's backend, with `key` (None: the provider needs none)
    and the history calls' kept `thought_signatures` (Gemini's, by call id)."""
    route = attempt.route
    provider, model = route.provider, route.model
    # The platform's service token authenticates the platform's own traffic; a route
    # on the company's own key is the company's, so it never carries that token (a
    # company "key" for an in-house backend would otherwise ride the platform's
    # credential; the control plane refuses such keys, `company_llm.takes_own_key`).
    own_key = route.api_key is not None or bool(route.api_keys)
    service_token = None if own_key else settings.service_tokens.get(provider.name)
    return UpstreamCall(
        base_url=provider.base_url,
        api_key=key,
        upstream_model=model.upstream_model,
        messages=attempt.messages,
        max_tokens=attempt.max_tokens,
        stream=stream,
        params=attempt.params,
        request_id=grant.request_id,
        context=CallerContext(
            grant.user_id, grant.company_id, grant.role, grant.session_id, grant.request_id
        ),
        service_token=service_token.reveal() if service_token else None,
        thought_signatures=thought_signatures or {},
    )
