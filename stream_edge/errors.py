"""The edge's exception tree, mapped to OpenAI-shaped errors in one place.

EdgeError
├── Unauthorized        401  (token rejected: bad, expired, used, revoked)
├── Forbidden           403  (scope, model, an agent's token on completions)
├── NotFound            404
├── MethodNotAllowed    405  (+ Allow)
├── Gone                410  (a resume asks for events its log did not keep)
├── BadRequest          400
├── InputTooLarge       413
│   └── PayloadTooLarge 413  (the body itself; the connection is closed)
├── TooManyRequests     429  (+ Retry-After)
├── ClientClosedRequest 499  (the client left mid-body; the answer reaches no one)
├── ServiceUnavailable  503
├── UpstreamError       502 / 504 (before the first byte of a stream)
└── InitRefused         4xx  (the control plane refused an API-key caller's init)
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response


class EdgeError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}


class Unauthorized(EdgeError):
    status = 401
    type = "authentication_error"
    code = "invalid_token"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer error="invalid_token"'}


class Forbidden(EdgeError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(EdgeError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(EdgeError):
    """Starlette's own 405 (a route that serves other methods), which answered plain
    text: the edge's errors are OpenAI-shaped everywhere (DESIGN §9). `Allow` kept."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow}


class Gone(EdgeError):
    status = 410
    type = "invalid_request_error"
    code = "gone"


class BadRequest(EdgeError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InputTooLarge(EdgeError):
    status = 413
    type = "invalid_request_error"
    code = "input_too_large"


class PayloadTooLarge(InputTooLarge):
    """The body is over the edge's limit. The answer closes the connection: the
    server would otherwise go on reading (and discarding) the rest of the body."""

    code = "payload_too_large"

    def __init__(self, message: str = "the request body is too large") -> None:
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class ClientClosedRequest(EdgeError):
    status = 499  # nginx's "client closed request"
    type = "invalid_request_error"
    code = "client_closed_request"


class TooManyRequests(EdgeError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ServiceUnavailable(EdgeError):
    status = 503
    type = "server_error"
    code = "unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class UpstreamError(EdgeError):
    """The backend failed before the stream started. `kind` is a bounded metric label."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        code: str = "upstream_error",
        status: int = 502,
        upstream_status: int | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        # The backend's own HTTP status, when it answered (None: it never did).
        self.upstream_status = upstream_status


class InitRefused(EdgeError):
    """An API-key caller's init was refused (key_callers.py): the control plane's
    status, code and message, in OpenAI's shape; 429 keeps its Retry-After."""

    def __init__(
        self, status: int, type_: str, message: str, code: str, *, retry_after: int | None
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.type = type_
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        if self.retry_after is not None:
            return {"Retry-After": str(self.retry_after)}
        if self.status == 401:
            return {"WWW-Authenticate": 'Bearer error="invalid_token"'}
        return {}


def error_body(message: str, type_: str, code: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "code": code}})


def error_response(exc: EdgeError, request_id: str | None = None) -> Response:
    headers = exc.headers()
    if request_id:
        headers["X-Request-Id"] = request_id
    return Response(
        error_body(exc.message, exc.type, exc.code),
        status_code=exc.status,
        media_type="application/json",
        headers=headers,
    )


async def handle_edge_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EdgeError)
    return error_response(exc)
