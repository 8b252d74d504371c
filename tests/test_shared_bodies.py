"""`shared.bodies.read_limited`: the byte limit both services read bodies under."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from starlette.requests import Request

from shared.bodies import read_limited


class TooLarge(Exception):
    pass


class Gone(Exception):
    pass


def request(content_length: bytes | None, chunks: list[bytes]) -> tuple[Request, list[int]]:
    """A request whose receive hands out `chunks` and counts what was taken."""
    headers = [(b"content-length", content_length)] if content_length is not None else []
    taken = [0]

    async def receive() -> dict[str, Any]:
        if taken[0] < len(chunks):
            taken[0] += 1
            return {"type": "http.request", "body": chunks[taken[0] - 1], "more_body": True}
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    reader: Callable[[], Awaitable[dict[str, Any]]] = receive
    return Request(scope, reader), taken


async def test_a_body_within_the_limit_is_read_whole() -> None:
    req, _ = request(b"6", [b"abc", b"def"])
    assert await read_limited(req, 6, TooLarge, Gone) == b"abcdef"


async def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    req, taken = request(b"7", [b"abcdefg"])
    with pytest.raises(TooLarge):
        await read_limited(req, 6, TooLarge, Gone)
    assert taken[0] == 0


async def test_a_chunked_body_stops_at_the_limit() -> None:
    req, taken = request(None, [b"x" * 4] * 100)
    with pytest.raises(TooLarge):
        await read_limited(req, 10, TooLarge, Gone)
    assert taken[0] == 3


@pytest.mark.parametrize("declared", ["²".encode("latin-1"), b"1e9", b"-1", b""])
async def test_an_odd_content_length_is_no_500(declared: bytes) -> None:
    """A non-ASCII digit passes str.isdigit() but not int(): it is ignored, and the
    bytes actually sent are counted instead."""
    req, _ = request(declared, [b"ab"])
    assert await read_limited(req, 6, TooLarge, Gone) == b"ab"


async def test_a_client_leaving_mid_body_raises_the_services_own_error() -> None:
    """Not Starlette's ClientDisconnect, which each service would log as a bug."""
    sent = [{"type": "http.request", "body": b"ab", "more_body": True}]

    async def receive() -> dict[str, Any]:
        return sent.pop() if sent else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    with pytest.raises(Gone):
        await read_limited(Request(scope, receive), 6, TooLarge, Gone)
