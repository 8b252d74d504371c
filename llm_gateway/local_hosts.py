"""`llm-gateway dev` answers only requests addressed to this machine by name.

Listening on loopback (`check_local_host`) keeps other machines out, but not
other websites: a page the developer visits can point its own name at 127.0.0.1
(DNS rebinding). The browser then counts the gateway as that page's origin, so the
page reads every answer, signs in as the demo owner with its published password,
mints API keys and streams on the platform's keys from the environment. Chromium's
Private Network Access does not stop it: the page opens a popup on any of the
gateway's own paths (a document loaded from loopback) and calls `fetch` through it.

What such a page cannot forge is the `Host` header: it is the page's own name. So
each dev app answers only a Host that names loopback (an IP literal, `localhost`,
`*.localhost`, which browsers resolve themselves, RFC 6761 §6.3) or the hosts the
operator configured in the public URLs; anything else is refused with a 400 before
the app sees the request. Browsers' own defence and this one are the ones
webpack-dev-server, Vite and Jupyter ship (`allowedHosts`).
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from shared.settings import ConfigError

MESSAGE = (
    "This development gateway answers only requests addressed to this machine "
    "(127.0.0.1 or localhost); the Host header named another site."
)


def host_name(header: str) -> str:
    """The name in a `Host` header, without its port, lowercased: `[::1]:80` → `::1`."""
    value = header.strip().lower()
    if value.startswith("["):
        name, _, port = value[1:].partition("]")
        return (
            name
            if port == "" or (port[:1] == ":" and port[1:].isascii() and port[1:].isdigit())
            else value
        )
    name, colon, port = value.rpartition(":")
    if colon and ":" not in name and port.isascii() and port.isdigit():
        return name
    return value


def is_local_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def configured_names(urls: Iterable[str]) -> frozenset[str]:
    """The host names of the operator's own URLs (e.g. `LLMGW_EDGE_PUBLIC_URL`)."""
    return frozenset(name for url in urls if (name := (urlsplit(url).hostname or "")))


def host_allowed(header: str | None, extra: frozenset[str]) -> bool:
    # No Host at all (HTTP/1.0) comes from no browser: a browser always sends its
    # page's name.
    if header is None:
        return True
    name = host_name(header)
    return is_local_name(name) or name in extra


class LocalHostsOnly:
    """Pure ASGI: refuse (400 `untrusted_host`, `body` in the app's error shape) any
    request whose Host is not this machine's; everything else passes untouched."""

    def __init__(self, app: ASGIApp, *, extra: frozenset[str], body: bytes) -> None:
        self.app = app
        self.extra = extra
        self.body = body

    @property
    def state(self) -> Any:
        # `servers.serve_all` finds the edge's drain hook on the app's state.
        return getattr(self.app, "state", None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next(
            (value.decode("latin-1") for key, value in scope["headers"] if key == b"host"), None
        )
        if host_allowed(header, self.extra):
            await self.app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self.body)).encode()),
                    (b"x-request-id", uuid.uuid4().hex.encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self.body})


DEV_ONLY_LOCAL = (
    "llm-gateway dev serves the owner demo@example.com with the published password "
    "'demo' (and the platform's keys from this environment), so it listens on loopback "
    "only: drop --host {host}, or serve others with llm-gateway control-plane and "
    "stream-edge and your own users"
)


def check_local_host(host: str) -> None:
    """Refuse a `--host` other people can reach: anyone who reads the README (or the
    demo page, which prefills it) signs in as the demo owner and spends its credits,
    on the platform's real keys when the environment holds some."""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass  # a name, or a wildcard spelled otherwise: it may resolve anywhere
    raise ConfigError(DEV_ONLY_LOCAL.format(host=host))
