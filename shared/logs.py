"""Logging setup with secrets kept out: stream tokens travel in `?token=` on the
EventSource path, so every log line is scrubbed of `token=…` and bearer values."""

from __future__ import annotations

import logging
import re

from shared.request_id import current_request_id

_TOKEN_QUERY = re.compile(r"(token=)[^&\s\"']+")
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_API_KEY = re.compile(r"\bsk_[A-Za-z0-9_-]{8,}")


def redact(text: str) -> str:
    text = _TOKEN_QUERY.sub(r"\1[redacted]", text)
    text = _BEARER.sub(r"\1[redacted]", text)
    return _API_KEY.sub("sk_[redacted]", text)


class RedactingFilter(logging.Filter):
    """Scrubs secrets and stamps the current request id on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get() or "-"
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s",
    )
    # Alembic narrates every plugin at INFO; only its warnings matter to an operator.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    redacting = RedactingFilter()
    for handler in logging.getLogger().handlers:
        handler.addFilter(redacting)
    for name in ("uvicorn", "uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.addFilter(redacting)
        for handler in logger.handlers:
            handler.addFilter(redacting)
