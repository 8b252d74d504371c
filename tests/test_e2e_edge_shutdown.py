"""Graceful shutdown of a real edge process (SIGTERM): streams shorter than the drain
finish normally, longer ones end with an `error` event `shutting_down`, every usage
report is delivered before exit, and the process exits cleanly."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.sse import ServerSentEvent, SSEDecoder
from tests.conftest import REDIS_URL
from tests.stack import SplitStack, base_env, edge_process


@pytest.fixture
def split(pg_database_url: str, redis_prefix: str) -> Iterator[SplitStack]:
    with SplitStack(base_env(pg_database_url, REDIS_URL, redis_prefix)) as stack:
        yield stack


def collect(url: str, out: list[ServerSentEvent], started: threading.Event) -> None:
    decoder = SSEDecoder()
    with httpx.stream("GET", url, timeout=30) as response:
        for raw in response.iter_raw():
            out.extend(decoder.feed(raw))
            if any(e.event == "chunk" for e in out):
                started.set()


def test_sigterm_drains_then_ends_streams_and_flushes_usage(
    split: SplitStack, tmp_path: Path
) -> None:
    c = split.client
    token = c.new_user(c.new_company("5"))
    short = c.init_ok(token, {"query": "short [[mock tokens=12 delay_ms=50]]"})
    long = c.init_ok(token, {"query": "long [[mock tokens=500 delay_ms=20]]"})
    with edge_process(split, tmp_path, LLMGW_DRAIN_SECONDS="1.5") as edge:
        results: dict[str, list[ServerSentEvent]] = {"short": [], "long": []}
        threads = []
        for name, grant in (("short", short), ("long", long)):
            started = threading.Event()
            thread = threading.Thread(
                target=collect, args=(grant["stream_url"], results[name], started)
            )
            thread.start()
            assert started.wait(10)
            threads.append(thread)
        sent_at = time.monotonic()
        edge.send_signal(signal.SIGTERM)
        assert edge.wait(timeout=20) == 0
        exited_after = time.monotonic() - sent_at
        for thread in threads:
            thread.join(timeout=10)
    assert results["short"][-1].event == "complete"
    assert results["long"][-1].event == "error"
    assert json.loads(results["long"][-1].data)["code"] == "shutting_down"
    assert 1.5 <= exited_after < 10
    # Both reports left the edge before it exited (the control plane never stopped).
    short_record = c.wait_usage(token, short["reservation_id"], timeout=5)
    long_record = c.wait_usage(token, long["reservation_id"], timeout=5)
    assert short_record["status"] == "completed"
    assert long_record["status"] == "failed"
    chunks = sum(1 for e in results["long"] if e.event == "chunk")
    assert chunks <= long_record["output_tokens"] < 500
    # The access log shows the EventSource requests, but never their tokens.
    log = (tmp_path / "edge.log").read_text()
    assert "GET /v1/stream?token=[redacted]" in log
    for grant in (short, long):
        assert grant["stream_token"] not in log
        assert grant["stream_token"].split(".")[2] not in log
