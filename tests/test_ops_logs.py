"""Structured logs: one JSON object per line with the fields operators filter on, a
text format for people, and never a secret — checked on the formatter directly and
on the logs real `llm-gateway` processes wrote while serving every kind of secret.
"""

from __future__ import annotations

import base64
import io
import logging
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from shared.logs import configure_logging, redact
from shared.request_id import current_request_id
from shared.settings import ConfigError
from tests.ops_processes import CLI, ROOT, ProcessStack, sse_events
from tests.stack import ADMIN_TOKEN

JWT = "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.eyJzdWIiOiJ1MSIsImp0aSI6ImoxIn0.c2lnbmF0dXJlLWJ5dGVz"
WHSEC = "whsec_" + base64.b64encode(b"w" * 32).decode()


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Our handler on a buffer; the process's logging restored afterwards."""
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    levels = {n: logging.getLogger(n).level for n in ("alembic", "httpx", "httpcore")}
    buffer = io.StringIO()
    yield buffer
    for handler in [h for h in root.handlers if h not in before[1]]:
        root.removeHandler(handler)
    root.setLevel(before[0])
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_lines_carry_the_fields_and_the_request_id(captured: io.StringIO) -> None:
    configure_logging("INFO", "json", stream=captured)
    log = logging.getLogger("llmgw.test")
    reset = current_request_id.set("req-123")
    try:
        log.info(
            "stream finished in %d ms",
            42,
            extra={"company_id": "co_1", "model": "mock-fast", "ms": 42.5, "output_tokens": 64},
        )
    finally:
        current_request_id.reset(reset)
    log.warning("no request here")
    first, second = lines(captured)
    assert set(first) >= {"ts", "level", "logger", "message", "request_id"}
    assert first["ts"].endswith("Z") and first["level"] == "info"
    assert first["logger"] == "llmgw.test" and first["message"] == "stream finished in 42 ms"
    assert first["request_id"] == "req-123"
    assert (first["company_id"], first["model"], first["ms"]) == ("co_1", "mock-fast", 42.5)
    assert first["output_tokens"] == 64  # a count, not a secret: kept
    assert second["request_id"] is None and second["level"] == "warning"


def test_access_lines_become_fields_with_the_token_redacted(captured: io.StringIO) -> None:
    configure_logging("INFO", "json", stream=captured)
    # The record uvicorn's access logger makes, handed straight to the root logger's
    # handlers (servers other tests ran may have detached the "uvicorn" loggers).
    args = ("10.0.0.1:5000", "GET", f"/v1/stream?token={JWT}", "1.1", 200)
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 0, '%s - "%s %s HTTP/%s" %d', args, None
    )
    logging.getLogger().handle(record)
    (line,) = lines(captured)
    assert (line["method"], line["status"]) == ("GET", 200)
    assert line["path"] == "/v1/stream?token=[redacted]"
    assert JWT not in captured.getvalue()


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_no_secret_survives_any_field(captured: io.StringIO, fmt: str) -> None:
    configure_logging("DEBUG", fmt, stream=captured)
    log = logging.getLogger("llmgw.test")
    secrets = [JWT, "sk_live0123456789abcdef", "sk-proj-abcdefghijklmnop", WHSEC, "hunter2-pw"]
    log.info("GET /v1/stream?token=%s", JWT)
    log.info("Authorization: Bearer %s", secrets[1])
    log.info("provider key %s, webhook secret %s", secrets[2], WHSEC)
    log.info('body {"email": "a@b.c", "password": "%s"}', secrets[4])
    log.info("db postgresql://app:%s@db:5432/llmgw", secrets[4])
    log.info("login", extra={"password": secrets[4], "token": JWT, "ctx": {"api_key": "x"}})
    log.info("nested", extra={"headers": {"authorization": f"Bearer {JWT}"}, "seen": [WHSEC]})
    try:
        raise ValueError(f"upstream refused key {secrets[2]} for {JWT}")
    except ValueError:
        log.exception("failed")
    text = captured.getvalue()
    for secret in secrets:
        assert secret not in text
    assert "[redacted]" in text
    if fmt == "json":  # one line per event, the traceback inside it
        assert len(lines(captured)) == 8
        assert "ValueError: upstream refused key sk-[redacted]" in lines(captured)[-1]["exception"]


def test_text_format_is_for_people(captured: io.StringIO) -> None:
    configure_logging("INFO", "text", stream=captured)
    reset = current_request_id.set("req-9")
    try:
        logging.getLogger("llmgw.test").info("hello", extra={"model": "mock-fast"})
    finally:
        current_request_id.reset(reset)
    line = captured.getvalue().strip()
    assert " INFO llmgw.test [req-9] hello model=mock-fast" in line
    assert not line.startswith("{")


def test_a_bad_format_is_one_clear_line(captured: io.StringIO) -> None:
    with pytest.raises(ConfigError, match="LLMGW_LOG_FORMAT"):
        configure_logging("INFO", "xml", stream=captured)
    result = subprocess.run(
        [*CLI, "mock-llm", "--port", "1"],
        env={"PATH": "/usr/bin:/bin", "LLMGW_LOG_FORMAT": "yaml"},
        cwd=ROOT,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines() == [
        "llm-gateway: configuration error: LLMGW_LOG_FORMAT must be json or text, got 'yaml'"
    ]


def test_redact_leaves_ordinary_text_alone() -> None:
    ordinary = 'usage webhook usage_abc delivered: 200 (model="mock-fast", max_tokens=64)'
    assert redact(ordinary) == ordinary


@pytest.mark.postgres
def test_real_processes_never_log_a_secret(
    pg_database_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """Logins, API keys, stream tokens (query and header), webhooks — at DEBUG level —
    and then not one secret in any service's log; every line one JSON object."""
    password, wrong = f"pw-{uuid.uuid4().hex}", f"wrong-{uuid.uuid4().hex}"
    provider_key = f"sk-provider-{uuid.uuid4().hex}"
    stack = ProcessStack(tmp_path, pg_database_url, redis_prefix, LLMGW_LOG_LEVEL="DEBUG")
    secrets: list[str] = [
        password,
        wrong,
        provider_key,
        ADMIN_TOKEN,
        stack.env["LLMGW_WEBHOOK_SECRET"],
        stack.env["LLMGW_WEBHOOK_SECRET"].removeprefix("whsec_"),
        stack.env["LLMGW_ENCRYPTION_KEY"],
    ]
    request_ids: list[str] = []
    with stack:
        c = stack.client
        company = c.new_company("20")
        email = f"ops-{uuid.uuid4().hex[:8]}@example.com"
        user = c.admin(
            "POST",
            "/v1/admin/users",
            json={"company_id": company, "email": email, "password": password, "role": "owner"},
        ).json()["data"]
        login = c.http.post(
            f"{c.cp_url}/v1/auth/login", json={"email": email, "password": password}
        )
        access = login.json()["data"]["access_token"]
        bad = c.http.post(f"{c.cp_url}/v1/auth/login", json={"email": email, "password": wrong})
        assert bad.status_code == 401
        key = c.admin("POST", "/v1/admin/api-keys", json={"user_id": user["id"]}).json()["data"]
        secrets += [access, key["key"]]
        # A provider key, where the control plane stores them (never returned or logged).
        c.admin(
            "PUT", f"/v1/admin/companies/{company}/providers/openai", json={"api_key": provider_key}
        )
        assert c.as_user(key["key"], "GET", "/v1/me").status_code == 200

        def init(bearer: str, text: str) -> dict[str, Any]:
            rid = f"ops-log-{uuid.uuid4().hex[:12]}"
            request_ids.append(rid)
            grant = c.as_user(
                bearer,
                "POST",
                "/v1/chat/init",
                headers={"X-Request-Id": rid},
                json={"messages": [{"role": "user", "content": f"{text} [[mock tokens=4]]"}]},
            ).json()["data"]
            secrets.append(grant["stream_token"])
            return dict(grant)

        by_query = init(access, "query token")
        with c.http.stream("GET", by_query["stream_url"]) as response:
            assert [name for name, _, _ in sse_events(response)][-1] == "complete"
        by_header = init(key["key"], "header token")
        headers = {"Authorization": f"Bearer {by_header['stream_token']}"}
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": False}
        done = c.http.post(by_header["completions_url"], json=body, headers=headers)
        assert done.status_code == 200, done.text
        reused = c.http.post(by_header["completions_url"], json=body, headers=headers)
        assert reused.status_code == 401
        forged = c.http.post(
            f"{c.cp_url}/v1/webhooks/usage",
            content=b"{}",
            headers={
                "webhook-id": "usage_x",
                "webhook-timestamp": "1",
                "webhook-signature": "v1,AA==",
            },
        )
        assert forged.status_code == 401
        for grant in (by_query, by_header):
            c.wait_usage(access, grant["reservation_id"])
    logs = stack.logs()  # after SIGTERM: shutdown lines included

    for name, text in logs.items():
        assert text.strip(), f"{name} logged nothing"
        for secret in secrets:
            assert secret not in text, f"{name}'s log contains a secret"
        for number, raw in enumerate(text.splitlines(), 1):
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                pytest.fail(f"{name}.log line {number} is not JSON: {raw[:200]}")
            assert {"ts", "level", "logger", "message", "request_id"} <= set(line), raw
            assert line["level"] not in ("error", "critical"), raw  # a healthy run
    # The edge's lines for a stream carry the request id minted at init.
    edge_lines = [orjson.loads(raw) for raw in logs["edge"].splitlines()]
    stream_lines = [x for x in edge_lines if x.get("path", "").startswith("/v1/stream")]
    assert stream_lines and stream_lines[0]["path"] == "/v1/stream?token=[redacted]"
    assert stream_lines[0]["request_id"] == request_ids[0]


# --- 12.1: redaction is linear, and an access line logs at most 2 KB of a path ---
def _best_of(repeats: int, work: Callable[[], object]) -> float:
    """The fastest of `repeats` runs: the least disturbed by the other processes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


HOSTILE_SHAPES = [
    "eyJaaaa-",  # the JWT rule restarted at every `-eyJ` (quadratic before 12.1)
    "-eyJ",
    "eyJaaaa.",
    "x.eyJaaaa",
    "sk_",
    "sk-a",
    "token=",
    "a_token",
    "Bearer ",
    "A",
    "A-",
    "whsec_",
    "password:",
    'password:"',
    "api_key ",
    "://a:",
]


def test_redaction_costs_the_same_on_hostile_text_as_on_ordinary_text() -> None:
    size = 64 * 1024
    ordinary = ("GET /v1/usage?limit=50&cursor=abc lorem ipsum dolor " * 2000)[:size]
    baseline = _best_of(3, lambda: redact(ordinary))
    for shape in HOSTILE_SHAPES:
        hostile = (shape * (size // len(shape) + 1))[:size]
        cost = _best_of(3, lambda text=hostile: redact(text))  # type: ignore[misc]
        assert cost < 5 * baseline, (shape, cost, baseline)


def test_a_64kb_hostile_path_costs_milliseconds(captured: io.StringIO) -> None:
    configure_logging("INFO", "json", stream=captured)
    root = logging.getLogger()

    def access(path: str) -> logging.LogRecord:
        args = ("10.0.0.1:5000", "GET", path, "1.1", 200)
        return logging.LogRecord(
            "uvicorn.access", logging.INFO, __file__, 0, '%s - "%s %s HTTP/%s" %d', args, None
        )

    normal = _best_of(20, lambda: root.handle(access("/healthz?q=hello")))
    hostile_path = "/healthz?q=" + "eyJaaaa-" * 8000
    hostile = _best_of(5, lambda: root.handle(access(hostile_path)))
    # ~25x here (2 KB redacted three times against a few bytes); 20,000x before.
    assert hostile < 200 * normal, (hostile, normal)
    line = lines(captured)[-1]
    assert len(line["path"]) < 2100 and line["path"].endswith("…[truncated]")
    assert len(line["message"]) < 2200
    # A token cut by the cap is still redacted (the `token=` rule needs no end).
    cut = access("/v1/stream?pad=" + "p" * 2020 + f"&token={JWT}")
    root.handle(cut)
    assert "eyJhbGci" not in captured.getvalue().splitlines()[-1]


# --- Log injection: text lines are one line each, with no terminal controls --------


def test_text_lines_cannot_be_forged_or_rewrite_the_terminal(captured: io.StringIO) -> None:
    """A hostile backend's error text is logged (`upstream error event: …`), and a
    company owner names its own models (the stream line's `model=`): a newline in
    either forged a whole log line, an ESC sequence moved the operator's cursor up and
    erased the line before it. Each record stays one line; controls are shown escaped."""
    configure_logging("INFO", "text", stream=captured)
    log = logging.getLogger("llmgw.test")
    forged = "2026-12-01 00:00:00,000 INFO control_plane [-] admin token rotated"
    log.warning("upstream error event: %.240s", f"overloaded\n{forged}")
    log.warning("upstream error event: %.240s", "x\r\u2028\x85\x00")
    log.info("stream completed", extra={"model": "mine\x1b[1A\x1b[2K", "status": "completed"})
    text = captured.getvalue()
    assert len(text.splitlines()) == 3, text
    assert not text.splitlines()[1].startswith("2026-12-01 00:00:00,000")
    for control in ("\x1b", "\r", "\u2028", "\x85", "\x00"):
        assert control not in text, repr(control)
    assert "overloaded\\x0a2026-12-01" in text and "model=mine\\x1b[1A\\x1b[2K" in text
    try:  # a traceback keeps its lines
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    assert "\nValueError: boom" in captured.getvalue()


def test_an_unhandled_errors_log_line_caps_the_path(caplog: pytest.LogCaptureFixture) -> None:
    """The error line names the request's path, which the client chose: cut at
    `MAX_LOGGED_PATH` as the access line is, not a megabyte per failing request."""
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from control_plane.metrics import Metrics
    from control_plane.middleware import RequestContextMiddleware
    from shared.logs import MAX_LOGGED_PATH

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("a bug")

    app = Starlette()
    app.mount("/", broken)
    app.add_middleware(RequestContextMiddleware, metrics=Metrics())
    path = "/" + "a" * 50_000
    with caplog.at_level(logging.ERROR), TestClient(app, raise_server_exceptions=False) as c:
        assert c.get(path).status_code == 500
    lines = [r.getMessage() for r in caplog.records if "unhandled error" in r.getMessage()]
    assert lines and all(len(line) < MAX_LOGGED_PATH + 200 for line in lines)
