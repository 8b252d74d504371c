"""Reading a request body under a byte limit, for both services.

Neither service ever buffers more than its limit: a declared `Content-Length` over
it is refused before a byte is read, and a chunked body is counted as it arrives
and refused the moment it passes the limit (issue 11.8: a 60 MiB chunked body used
to be read whole). Each service raises its own 413 (`too_large`), mapped to its own
error shape in one place.

A client that leaves mid-body (or whose body never came and was cut off by
`llm_gateway.http_guard`) raises the service's own `gone` (499, nginx's "client closed
request"): read first, before anything changes, so the request just ends; the answer
reaches no one, and no traceback is logged for what any client can do at will.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import ClientDisconnect, Request


async def read_limited(
    request: Request,
    limit: int,
    too_large: Callable[[], Exception],
    gone: Callable[[], Exception],
) -> bytes:
    declared = request.headers.get("content-length")
    # isascii: "²".isdigit() is True, and int("²") would raise (a 500, issue 12.5).
    if declared is not None and declared.isascii() and declared.isdigit():
        if int(declared) > limit:
            raise too_large()
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large()
            chunks.append(chunk)
    except ClientDisconnect:
        raise gone() from None
    return b"".join(chunks)
