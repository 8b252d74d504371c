"""The one exception the mock raises, rendered in each vendor's error shape.

* OpenAI: ``{"error": {"message", "type", "param", "code"}}``
  (https://platform.openai.com/docs/guides/error-codes)
* Anthropic: ``{"type": "error", "error": {"type", "message"}}``
  (https://docs.anthropic.com/en/api/errors)
* Google: ``{"error": {"code", "message", "status", "details"?}}``
  (https://ai.google.dev/gemini-api/docs/troubleshooting)

Official clients map the HTTP status to an exception class and read the message from
these bodies, so the mock matches them exactly. The in-house backend uses OpenAI's.
"""

from __future__ import annotations

from typing import Any

# OpenAI's ``type`` per status, so clients that branch on it behave as with the real API:
# a refused key is an ``invalid_request_error`` (code ``invalid_api_key``), a load 429
# names the limit it hit, ``requests`` or ``tokens`` (code ``rate_limit_exceeded``).
_TYPE_BY_STATUS = {
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "requests",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def error_type_for(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPE_BY_STATUS.get(status, "invalid_request_error")


def anthropic_type_for(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def google_status_for(status: int) -> str:
    return _GOOGLE_STATUS.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")


class MockAPIError(Exception):
    """An error answered before any byte of the response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or error_type_for(status)
        self.headers = headers or {}
        # When the client may come back: a ``Retry-After`` header for OpenAI and
        # Anthropic, a ``google.rpc.RetryInfo`` in Google's body (it sends no header).
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        """OpenAI's shape (also the in-house backend's)."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self) -> dict[str, Any]:
        return {
            "type": "error",
            "error": {"type": anthropic_type_for(self.status), "message": self.message},
        }

    def google_body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "code": self.status,
            "message": self.message,
            "status": google_status_for(self.status),
        }
        details: list[dict[str, Any]] = []
        if self.code and self.code.isupper():  # a google.rpc reason such as API_KEY_INVALID
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": self.code,
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                }
            )
        if self.retry_after_s is not None:
            # A protobuf Duration in JSON: seconds with an "s" (Google also sends
            # fractions, "45.837906927s").
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": f"{self.retry_after_s}s",
                }
            )
        if details:
            error["details"] = details
        return {"error": error}

    def headers_for(self, vendor: str) -> dict[str, str]:
        """The answer's extra headers (a vendor's own, such as its rate-limit headers).
        Google answers a 429 with no ``Retry-After``: its wait is in the body."""
        if self.retry_after_s is None or vendor == "google":
            return self.headers
        return {**self.headers, "Retry-After": str(self.retry_after_s)}

    def body_for(self, vendor: str) -> dict[str, Any]:
        if vendor == "anthropic":
            return self.anthropic_body()
        if vendor == "google":
            return self.google_body()
        return self.body()
