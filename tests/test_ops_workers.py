"""`llm-gateway stream-edge --workers N`: several worker processes behave as one edge.

A stream in flight shows in the merged `llmgw_edge_streams_active` whichever worker
answers the scrape, and SIGTERM to the supervisor drains every worker as a single
process does: the running stream ends with `shutting_down` after
`LLMGW_DRAIN_SECONDS`, is billed for what was relayed, and the edge exits cleanly.
(Counters and histograms summed over workers: `test_ops_metrics.py`.)
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from shared.text_tokens import pieces
from tests.ops_processes import ProcessStack, scrape, sse_events


@pytest.mark.postgres
def test_a_multi_worker_edge_counts_and_drains_as_one(
    pg_database_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    stack = ProcessStack(
        tmp_path, pg_database_url, redis_prefix, workers=2, LLMGW_DRAIN_SECONDS="1"
    )
    with stack:
        c = stack.client
        token = c.new_user(c.new_company("5"))
        grant = c.init_ok(token, {"query": "a long answer [[mock tokens=400 delay_ms=25]]"})
        events: list[tuple[str, dict[str, Any]]] = []
        first = threading.Event()

        def read() -> None:
            with c.http.stream("GET", grant["stream_url"], timeout=30) as response:
                for name, data, _ in sse_events(response):
                    events.append((name, data))
                    first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(10)
        # Any worker's scrape sees the one stream, wherever it runs.
        for _ in range(4):
            assert scrape(c.edge_url).value("llmgw_edge_streams_active") == 1
        edge = stack.procs["edge"]
        stopped = time.monotonic()
        edge.send_signal(signal.SIGTERM)
        reader.join(20)
        ended_after = time.monotonic() - stopped
        assert edge.wait(20) == 0
        assert events[-1][0] == "error" and events[-1][1]["code"] == "shutting_down"
        assert 0.8 <= ended_after < 8, ended_after  # the drain, not an instant cut
        texts = [data["content"] for name, data in events if name == "chunk"]
        assert 0 < len(texts) < 400
        # A token a delta, the mock's `" word."` ending a sentence two (a real vendor
        # streams the word and the period apart: `stream_edge.output_estimate`).
        relayed = sum(max(1, pieces(text.encode())) for text in texts)
        record = c.wait_usage(token, grant["reservation_id"])
        assert record["status"] == "failed" and record["output_tokens"] == relayed
