"""The upstream adapter interface and the normalised events every adapter yields.

An adapter knows one vendor's wire format: how to build the request, and how to
turn the bytes of its stream into `Delta`, `Usage`, `Finish` and `Failure` events.
It does no I/O itself, so each is tested by feeding it captured bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class CallerContext:
    """Who the stream is for. Sent to in-house backends that trust the gateway
    (providers with `service_token_env`), never to public vendors."""

    user_id: str
    company_id: str
    role: str
    session_id: str
    request_id: str


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """What to ask the backend for."""

    base_url: str
    api_key: str | None
    upstream_model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    stream: bool
    params: dict[str, Any]
    request_id: str
    context: CallerContext | None = None
    service_token: str | None = None


@dataclass(frozen=True, slots=True)
class HttpRequest:
    url: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of the answer. `raw` is the vendor's event payload, kept for pass-through."""

    text: str
    raw: bytes = b""


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    raw: bytes = b""


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str
    raw: bytes = b""


@dataclass(frozen=True, slots=True)
class Failure:
    """The backend reported an error inside its stream."""

    message: str


@dataclass(frozen=True, slots=True)
class Passthrough:
    """A vendor event with nothing for billing (e.g. the role chunk); `raw` as received."""

    raw: bytes


UpstreamEvent = Delta | Usage | Finish | Failure | Passthrough


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole (non-streamed) answer."""

    text: str
    finish_reason: str
    usage: Usage | None


class StreamParser(Protocol):
    def feed(self, chunk: bytes) -> list[UpstreamEvent]: ...

    @property
    def done(self) -> bool:
        """True once the vendor's end-of-stream marker arrived."""
        ...


class Adapter(Protocol):
    def build_request(self, call: UpstreamCall) -> HttpRequest: ...

    def stream_parser(self) -> StreamParser: ...

    def parse_completion(self, body: bytes) -> Completion:
        """Raise ValueError when the body is not a valid answer."""
        ...
