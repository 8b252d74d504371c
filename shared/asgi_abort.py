"""Cutting a client's connection on purpose, through the server (an ASGI extension).

The edge stops writing to a client it will not wait on, one stuck in a send: a slow
client (`slow_client`), a resume follower superseded by a reconnect. Its response
is then unfinished, and ASGI has no way for an app to say "cut this connection":
the app returned, and uvicorn closed the connection and logged "ASGI callable
returned without completing response." at ERROR, once per cut. A flood of
reconnects that read nothing was a flood of ERRORs in the operator's log, for no
error at all.

Our server (`llm_gateway.http_guard`, which every service runs under) offers the
cut in the request's scope: ``scope["extensions"][ABORT]["abort"]()`` aborts the
connection and marks the request's client gone, as a disconnect does, so the
server's report of an unfinished response stays for the app bugs it is meant for. Under another
server (tests' plain uvicorn) there is none, and the server closes the connection
as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

ABORT = "llm_gateway.abort"


def abort_extension(abort: Callable[[], None]) -> dict[object, object]:
    """The server's side: the extension's entry (ASGI extensions are dicts) whose
    ``"abort"`` cuts this request's connection."""
    return {"abort": abort}


def abort_connection(scope: Mapping[str, Any]) -> bool:
    """The app's side: cut the request's connection now, dropping whatever its client
    has not read; False when the server offers no cut."""
    offered = (scope.get("extensions") or {}).get(ABORT)
    abort = offered.get("abort") if isinstance(offered, dict) else None
    if not callable(abort):
        return False
    abort()
    return True
