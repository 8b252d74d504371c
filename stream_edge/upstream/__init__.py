"""Upstream adapters, one module per wire format, chosen by the provider's `api_type`.

Adding a vendor is one module implementing `base.Adapter` plus one line here.
"""

from __future__ import annotations

from collections.abc import Callable

from shared.catalog import Provider
from stream_edge.upstream.anthropic_messages import AnthropicMessagesAdapter
from stream_edge.upstream.base import Adapter
from stream_edge.upstream.gemini import GeminiAdapter
from stream_edge.upstream.openai_chat import OpenAIChatAdapter
from stream_edge.upstream.sse_backend import SSEBackendAdapter

_ADAPTERS: dict[str, Callable[[Provider], Adapter]] = {
    "openai_chat": lambda _: OpenAIChatAdapter(),
    "anthropic_messages": lambda _: AnthropicMessagesAdapter(),
    "gemini": lambda _: GeminiAdapter(),
    "sse_backend": SSEBackendAdapter.for_provider,
}


def adapter_for(provider: Provider) -> Adapter | None:
    """The adapter for the provider's wire format, or None when the edge cannot speak it."""
    factory = _ADAPTERS.get(provider.api_type)
    return factory(provider) if factory is not None else None
