"""The edge's Prometheus metrics tell what happened to each stream, once (DESIGN §8):
`llmgw_edge_streams_active` back where it was once the stream is reported,
`llmgw_edge_streams_total{status}` the usage record's status, `llmgw_edge_tokens_total`
its tokens and `llmgw_edge_upstream_errors_total` one backend failure per failed
stream, whether the answer was streamed or asked whole (`"stream": false`, asked of
the backend as a stream since whole answers are), and whether the failure came
while the backend opened or while it answered. Through the in-process gateway
(`tests/inproc.py`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.inproc import Gateway, events, gateway_env, opened

on_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("edge-metrics")
    async with Gateway(gateway_env(str(tmp))) as gateway:
        yield gateway


def _sample(gw: Gateway, name: str, **labels: str) -> float:
    value = gw.edge_state().metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def _snapshot(gw: Gateway) -> dict[str, float]:
    found = {
        "active": _sample(gw, "llmgw_edge_streams_active"),
        "errors": sum(
            s.value
            for metric in gw.edge_state().metrics.registry.collect()
            if metric.name == "llmgw_edge_upstream_errors"
            for s in metric.samples
            if s.name == "llmgw_edge_upstream_errors_total"
        ),
        "input": _sample(gw, "llmgw_edge_tokens_total", direction="input"),
        "output": _sample(gw, "llmgw_edge_tokens_total", direction="output"),
    }
    for status in ("completed", "cancelled", "failed", "revoked"):
        found[status] = _sample(gw, "llmgw_edge_streams_total", status=status)
    return found


async def _run(gw: Gateway, prompt: str, stream: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """One stream of `prompt`, streamed or whole; the metrics' moves and its record."""
    access = await gw.new_user()
    grant = await gw.init_ok(access, {"query": prompt, "max_tokens": 200})
    before = _snapshot(gw)
    if stream:
        async with opened(await gw.get(grant["stream_url"])) as response:
            await events(response)
    else:
        body = {"stream": False, "messages": [{"role": "user", "content": prompt}]}
        await gw.complete(grant["stream_token"], body)
    record = await gw.wait_usage(access, grant["reservation_id"])
    after = _snapshot(gw)
    return {k: after[k] - before[k] for k in after}, record


@on_loop
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize(
    ("prompt", "status", "errors"),
    [
        ("fine [[mock tokens=5]]", "completed", 0),
        ("breaks [[mock tokens=20 error_after=3]]", "failed", 1),
        ("cut [[mock tokens=20 drop_after=3]]", "failed", 1),
    ],
    ids=["completed", "error_event", "dropped"],
)
async def test_each_stream_moves_the_edge_metrics_once(
    gw: Gateway, stream: bool, prompt: str, status: str, errors: int
) -> None:
    """Before, a whole answer whose backend failed once it had begun answering (its
    error event, its connection cut) counted nothing in
    `llmgw_edge_upstream_errors_total` (measured: 0 where the same failure streamed
    counts 1): only the opening and the stream's relay counted backend failures."""
    moved, record = await _run(gw, prompt, stream)
    assert record["status"] == status
    assert moved["active"] == 0
    assert moved[status] == 1
    assert sum(moved[s] for s in ("completed", "cancelled", "failed", "revoked")) == 1
    assert (moved["input"], moved["output"]) == (
        record["input_tokens"],
        record["output_tokens"],
    )
    assert moved["errors"] == errors
