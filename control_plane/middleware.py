"""The outermost layer of every request, as a pure ASGI middleware: the request id,
the last-resort error answer, and the HTTP metrics.

* A NUL character in the path or the query string (``%00``) is answered 400
  ``invalid_characters`` before any handler runs (DESIGN §11): path parameters
  and query values reach SQL, and PostgreSQL refuses NUL in text with an error.
* ``X-Request-Id``: echoed when the client sent a sane one (≤ 128 chars of
  ``[A-Za-z0-9._-]``), otherwise a fresh one; handlers read it via `request_id`.
* An exception nobody handled is logged with its traceback and answered with a
  500 envelope (no stack trace to the client). If the response had already
  started, the exception propagates and the server drops the connection.
* ``llmgw_cp_http_requests_total{route,status}`` and the duration histogram, labelled
  with the matched route's path template (``unmatched`` for unknown paths).
"""

from __future__ import annotations

import logging
import time

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.errors import InvalidCharacters, error_response, internal_error_response
from control_plane.metrics import Metrics
from shared.logs import cap_path
from shared.request_id import choose_request_id, current_request_id

log = logging.getLogger("control_plane")

REQUEST_ID_KEY = "llmgw.request_id"


def request_id(request: Request) -> str:
    value = request.scope.get(REQUEST_ID_KEY)
    return value if isinstance(value, str) else "-"


def has_nul(scope: Scope) -> bool:
    """NUL in the decoded path or, percent-encoded or raw, in the query string."""
    query = scope.get("query_string", b"")
    return "\x00" in scope.get("path", "") or b"%00" in query or b"\x00" in query


def _route_label(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                sent = value.decode("latin-1")
                break
        rid = choose_request_id(sent)
        scope[REQUEST_ID_KEY] = rid
        current_request_id.set(rid)  # every log line of this request carries it
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-Id"] = rid
            await send(message)

        try:
            if has_nul(scope):
                await error_response(InvalidCharacters())(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "unhandled error on %s %s (request %s)",
                scope["method"],
                cap_path(scope["path"]),
                rid,
            )
            if response_started:
                raise
            await internal_error_response()(scope, receive, send_with_id)
        finally:
            self.metrics.http_served(_route_label(scope), status, time.perf_counter() - started)
