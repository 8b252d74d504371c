"""Logging for operators: one JSON object per line (the default) or plain text for
humans (`LLMGW_LOG_FORMAT=text`), with secrets scrubbed from every field.

A JSON line carries ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
``request_id`` (the request being served, from `shared.request_id`, else null), the
fields a caller passes with ``extra=`` (``company_id``, ``model``, ``duration_ms``…),
the access-log fields of uvicorn's lines (``method``, ``path``, ``status``…) and
``exception`` when there is one.

Secrets never reach a log (DESIGN §10): stream tokens travel in ``?token=`` on the
EventSource path and as bearer values, so every string that leaves here — message,
extra fields, tracebacks — goes through `redact`, which removes JWTs, bearer values,
API keys (``sk_…``, vendors' ``sk-…``), webhook secrets (``whsec_…``), passwords
(``password=``/``"password": …``, ``user:pass@`` in URLs) and secret-looking query
parameters. Extra fields whose name says they hold a secret are dropped outright.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import IO, Any

import orjson

from shared.request_id import current_request_id
from shared.settings import ConfigError

FORMAT_ENV = "LLMGW_LOG_FORMAT"
FORMATS = ("json", "text")
REDACTED = "[redacted]"
# What is logged of a request path: anyone can send a 64 KB one, and every access
# line is redacted on the event loop; 2 KB keeps every real path and query whole.
MAX_LOGGED_PATH = 2048
TRUNCATED = "…[truncated]"

_SECRET_KEY = r"(?:password|passwd|secret|api[_-]?key|access[_-]?token|token|authorization)"
_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # A JWT anywhere (stream tokens, login access tokens), whatever surrounds it.
    # Linear on hostile text: a header segment stops before the next "-eyJ" (itself
    # a candidate start), so `eyJaaaa-` repeated is not rescanned from every `eyJ`,
    # which made `\beyJ[A-Za-z0-9_-]{4,}\.` quadratic (64 KB took a second).
    (
        re.compile(
            r"(?<!\w)eyJ(?:[A-Za-z0-9_]|-(?!eyJ)){4,}+\.[A-Za-z0-9_-]{4,}+\.[A-Za-z0-9_-]*+"
        ),
        REDACTED,
    ),
    (re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE), r"\1" + REDACTED),
    (re.compile(r"\bsk([_-])[A-Za-z0-9_-]{8,}"), r"sk\1" + REDACTED),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=_-]+"), "whsec_" + REDACTED),
    # Query strings and form bodies: ?token=…, &key=…, password=…
    (re.compile(r"(?i)(\b\w*(?:token|key|secret|password|passwd)=)[^&\s\"']+"), r"\1" + REDACTED),
    # JSON-ish or repr-ish "password": "…" / 'api_key': '…' (whole quoted value),
    # then unquoted `secret: …`.
    (
        re.compile(rf"(?i)(\b\w*{_SECRET_KEY}[\"']?\s*[:=]\s*)([\"'])(?:(?!\2).)*\2"),
        r"\1\2" + REDACTED + r"\2",
    ),
    (re.compile(rf"(?i)(\b\w*{_SECRET_KEY}[\"']?\s*:\s*)[^\"'\s,}}&]+"), r"\1" + REDACTED),
    # user:password@host in URLs (database and Redis URLs).
    (re.compile(r"(://[^:/@\s]*:)[^@\s/]+@"), r"\1" + REDACTED + "@"),
)
# An extra field named like a secret (`password`, `stream_token`, `webhook_secret`;
# not `output_tokens`) is dropped whatever its value looks like.
_SECRET_FIELD = re.compile(rf"(?i)(?:^|_){_SECRET_KEY}$")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
    "taskName",
}


# What a text line must not carry raw: C0 and C1 controls, DEL and the Unicode line
# separators. Logged values come from clients, companies (their model ids) and
# backends (their error text): a line break there forged a whole log line, an ESC
# sequence moved the reading terminal's cursor and erased lines. JSON lines escape
# them already (orjson).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """Pure: `text` with every control character shown as ``\\xNN`` (``\\uNNNN``)."""

    def shown(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROLS.sub(shown, text)


def redact(text: str) -> str:
    """`text` with every secret we can recognise replaced by ``[redacted]``."""
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


def _clean(value: Any) -> Any:
    """A JSON-safe, redacted copy of an extra field's value."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {
            str(k): REDACTED if _SECRET_FIELD.search(str(k).replace("-", "_")) else _clean(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v) for v in value]
    return redact(str(value))


def _request_id(record: logging.LogRecord) -> str | None:
    stamped = getattr(record, "request_id", None)
    value = stamped if isinstance(stamped, str) else current_request_id.get()
    return None if value in (None, "-") else value


def _is_access(record: logging.LogRecord) -> bool:
    args = record.args
    return record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5


def cap_path(path: str) -> str:
    """At most `MAX_LOGGED_PATH` characters of `path`, marked when cut."""
    return path if len(path) <= MAX_LOGGED_PATH else path[:MAX_LOGGED_PATH] + TRUNCATED


def _cap_access_path(record: logging.LogRecord) -> None:
    """Shorten the path argument of a uvicorn access record in place, before its
    message is ever built from it."""
    if _is_access(record):
        args = tuple(record.args)  # type: ignore[arg-type]
        if len(str(args[2])) > MAX_LOGGED_PATH:
            record.args = (*args[:2], cap_path(str(args[2])), *args[3:])


def _access_fields(record: logging.LogRecord) -> dict[str, Any]:
    """uvicorn's access line `'%s - "%s %s HTTP/%s" %d'` as fields (path redacted)."""
    if not _is_access(record):
        return {}
    client, method, path, http_version, status = record.args  # type: ignore[misc]
    return {
        "client": str(client),
        "method": str(method),
        "path": redact(cap_path(str(path))),
        "http_version": str(http_version),
        "status": status,
    }


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller attached with ``extra=``, secret-named ones dropped."""
    return {
        key: _clean(value)
        for key, value in vars(record).items()
        if key not in _RECORD_ATTRS and not key.startswith("_") and not _SECRET_FIELD.search(key)
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line; see the module docstring for the fields."""

    def format(self, record: logging.LogRecord) -> str:
        _cap_access_path(record)
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
            "request_id": _request_id(record),
        }
        access = getattr(record, "_access", None) or _access_fields(record)
        for key, value in {**access, **extra_fields(record)}.items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            doc["stack"] = redact(self.formatStack(record.stack_info))
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request id] message key=value…``, redacted as a whole."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The line itself, one line whatever it quotes; a traceback is added after it
        # on lines of its own.
        return escape_controls(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        _cap_access_path(record)
        if not hasattr(record, "request_id"):
            record.request_id = _request_id(record) or "-"
        line = super().format(record)
        extras = extra_fields(record)
        if extras:
            line += " " + " ".join(f"{k}={escape_controls(str(v))}" for k, v in extras.items())
        return redact(line)


class RedactingFilter(logging.Filter):
    """Scrubs the message and stamps the current request id on every record (for
    handlers other than ours, e.g. a test's log capture)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(getattr(record, "request_id", None), str):
            record.request_id = current_request_id.get() or "-"
        if not hasattr(record, "_access"):  # before the arguments are merged below
            _cap_access_path(record)
            record._access = _access_fields(record)
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def _formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def resolve_format(fmt: str | None, default: str = "json") -> str:
    """`fmt`, else ``LLMGW_LOG_FORMAT``, else `default`; ConfigError when unknown."""
    chosen = (fmt or os.environ.get(FORMAT_ENV) or default).strip().lower()
    if chosen not in FORMATS:
        raise ConfigError(f"{FORMAT_ENV} must be json or text, got {chosen!r}")
    return chosen


class StderrHandler(logging.StreamHandler[IO[str]]):
    """Writes to whatever `sys.stderr` is when a record is emitted, not the one it
    was made with: a server thread that outlives a swapped stderr (a test runner's
    per-test capture) then never writes to a closed file."""

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _value: IO[str]) -> None:
        pass


def configure_logging(
    level: str = "INFO",
    fmt: str | None = None,
    *,
    default_format: str = "json",
    stream: IO[str] | None = None,
) -> None:
    """Send every log record to `stream` (stderr) in the chosen format.

    Idempotent: a second call replaces the handler the first one installed, and
    leaves other handlers (a test's capture) alone."""
    chosen = resolve_format(fmt, default_format)
    if not isinstance(logging.getLevelName(level.upper()), int):
        raise ConfigError(f"LLMGW_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "llmgw", False)]:
        root.removeHandler(old)
    handler: logging.StreamHandler[IO[str]] = (
        logging.StreamHandler(stream) if stream is not None else StderrHandler()
    )
    handler.llmgw = True  # type: ignore[attr-defined]
    handler.setFormatter(_formatter(chosen))
    redacting = RedactingFilter()
    handler.addFilter(redacting)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Alembic narrates every plugin at INFO, httpx every request: unless debugging,
    # only their warnings matter to an operator.
    quiet = logging.WARNING if root.level > logging.DEBUG else logging.NOTSET
    for noisy in ("alembic", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(quiet)
    for name in ("uvicorn", "uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(redacting)
