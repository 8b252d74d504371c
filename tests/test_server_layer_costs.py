"""What the per-request layer skips to save CPU keeps its contract: the request
metrics' cached children count exactly what `labels()` would, and the access log is
still written whenever `uvicorn.access` logs INFO (only its arguments are no longer
built when the level drops the line)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from uvicorn.server import ServerState

from control_plane.metrics import Metrics
from llm_gateway.http_guard import ConnectionLimits, GuardedHttpToolsProtocol


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_http_served_counts_as_labels_would() -> None:
    metrics = Metrics()
    metrics.http_served("/v1/chat/init", 201, 0.002)
    metrics.http_served("/v1/chat/init", 201, 0.004)
    metrics.http_served("/v1/chat/init", 429, 0.001)
    metrics.http_served("unmatched", 404, 0.0005)
    metrics.http_requests.labels(route="/v1/chat/init", status="201").inc()  # same child

    requests = "llmgw_cp_http_requests_total"
    assert sample(metrics, requests, route="/v1/chat/init", status="201") == 3
    assert sample(metrics, requests, route="/v1/chat/init", status="429") == 1
    assert sample(metrics, requests, route="unmatched", status="404") == 1
    duration = "llmgw_cp_http_request_duration_seconds"
    assert sample(metrics, duration + "_count", route="/v1/chat/init") == 3
    assert sample(metrics, duration + "_sum", route="/v1/chat/init") == pytest.approx(0.007)
    assert sample(metrics, duration + "_count", route="unmatched") == 1


@pytest.fixture
def access_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("uvicorn.access")
    handler = logging.NullHandler()
    level = logger.level
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def protocol() -> GuardedHttpToolsProtocol:
    config = uvicorn.Config(Starlette(), lifespan="off", log_config=None)
    loop = asyncio.new_event_loop()
    try:
        return GuardedHttpToolsProtocol(
            config=config,
            server_state=ServerState(),
            app_state={},
            _loop=loop,
            limits=ConnectionLimits(),
        )
    finally:
        loop.close()


def test_access_log_follows_the_level(access_logger: logging.Logger) -> None:
    access_logger.setLevel(logging.INFO)
    assert protocol().access_log is True
    access_logger.setLevel(logging.WARNING)
    assert protocol().access_log is False
    # A level lowered later applies to the next connections.
    access_logger.setLevel(logging.DEBUG)
    assert protocol().access_log is True
