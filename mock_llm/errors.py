"""The one exception the mock raises, and OpenAI's error body shape.

OpenAI answers every error as ``{"error": {"message", "type", "param", "code"}}``;
clients such as the official ``openai`` package map the HTTP status to an
exception class and read ``message`` from that body, so the mock matches it exactly.
"""

from __future__ import annotations

from typing import Any

# OpenAI's ``type`` per status, so clients that branch on it behave as with the real API.
_TYPE_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type_for(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPE_BY_STATUS.get(status, "invalid_request_error")


class MockAPIError(Exception):
    """An error answered before any byte of the response, in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or error_type_for(status)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
