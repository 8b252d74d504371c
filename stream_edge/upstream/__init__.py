"""Upstream adapters, one module per wire format, chosen by the provider's `api_type`."""

from __future__ import annotations

from shared.catalog import Provider
from stream_edge.upstream.base import Adapter
from stream_edge.upstream.openai_chat import OpenAIChatAdapter

_ADAPTERS: dict[str, type[OpenAIChatAdapter]] = {"openai_chat": OpenAIChatAdapter}


def adapter_for(provider: Provider) -> Adapter | None:
    """The adapter for the provider's wire format, or None when the edge cannot speak it."""
    cls = _ADAPTERS.get(provider.api_type)
    return cls() if cls is not None else None
