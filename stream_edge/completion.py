"""A non-streamed answer (`"stream": false`): the backend's whole body, read, parsed
by the backend's adapter and accounted on its meter."""

from __future__ import annotations

from stream_edge.attempts import Backend
from stream_edge.errors import UpstreamError
from stream_edge.transport import Response, TransportError, read_at_most
from stream_edge.upstream.base import Completion

# The largest whole answer read; past it the answer is a 502, its connection closed.
# Room for the longest answers: an in-house SSE backend sends `stream: false` answers
# as a whole stream, some 200 bytes a token, so 16k tokens come to about 3 MiB.
MAX_COMPLETION_BYTES = 8 * 1024 * 1024


async def read_completion(response: Response, backend: Backend) -> Completion:
    """Raise `UpstreamError` when the answer cannot be read or understood; the
    response is closed either way."""
    adapter = backend.adapter
    assert adapter is not None  # opening refused a provider without one
    try:
        body, longer = await read_at_most(response, MAX_COMPLETION_BYTES)
        if longer:
            raise UpstreamError(
                f"the backend's answer was longer than {MAX_COMPLETION_BYTES >> 20} MiB"
            )
        completion = adapter.parse_completion(body, backend.credentials)
    except (TransportError, ValueError) as exc:
        raise UpstreamError("the backend's answer was malformed") from exc
    finally:
        await response.aclose()
    backend.meter.record_text(
        completion.text, completion.usage, completion.finish_reason, completion.tool_calls
    )
    return completion
