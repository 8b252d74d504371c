"""A non-streamed answer (`"stream": false`): the backend's whole body, read, parsed
by the backend's adapter and accounted on its meter."""

from __future__ import annotations

from stream_edge.attempts import Backend
from stream_edge.errors import UpstreamError
from stream_edge.transport import Response, TransportError
from stream_edge.upstream.base import Completion


async def read_completion(response: Response, backend: Backend) -> Completion:
    """Raise `UpstreamError` when the answer cannot be read or understood; the
    response is closed either way."""
    adapter = backend.adapter
    assert adapter is not None  # opening refused a provider without one
    try:
        body = await response.aread()
        completion = adapter.parse_completion(body)
    except (TransportError, ValueError) as exc:
        raise UpstreamError("the backend's answer was malformed") from exc
    finally:
        await response.aclose()
    backend.meter.record_text(
        completion.text, completion.usage, completion.finish_reason, completion.tool_calls
    )
    return completion
