"""The edge's Prometheus metrics tell what happened to each stream, once (DESIGN §8):
`llmgw_edge_streams_active` back where it was once the stream is reported,
`llmgw_edge_streams_total{status}` the usage record's status, `llmgw_edge_tokens_total`
its tokens and `llmgw_edge_upstream_errors_total` one backend failure per failed
stream, whether the answer was streamed or asked whole (`"stream": false`, asked of
the backend as a stream since whole answers are), and whether the failure came
while the backend opened or while it answered. Through the in-process gateway
(`tests/inproc.py`)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests import edge_scenarios as scenario
from tests.inproc import Gateway, events, eventually, gateway_env, opened

on_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("edge-metrics")
    async with Gateway(gateway_env(str(tmp))) as gateway:
        yield gateway


def snapshot(gw: Gateway, edge: str = "edge") -> dict[str, float]:
    registry = gw.edge_state(edge).metrics.registry

    def _sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    found = {
        "active": _sample("llmgw_edge_streams_active"),
        "errors": sum(
            s.value
            for metric in registry.collect()
            if metric.name == "llmgw_edge_upstream_errors"
            for s in metric.samples
            if s.name == "llmgw_edge_upstream_errors_total"
        ),
        "input": _sample("llmgw_edge_tokens_total", direction="input"),
        "output": _sample("llmgw_edge_tokens_total", direction="output"),
    }
    for status in ("completed", "cancelled", "failed", "revoked"):
        found[status] = _sample("llmgw_edge_streams_total", status=status)
    for outcome in ("delivered", "retry", "rejected"):
        found[outcome] = _sample("llmgw_edge_webhook_deliveries_total", outcome=outcome)
    settled = gw.cp.state.deps.metrics.registry
    for outcome in ("settled", "duplicate"):
        found[f"cp_{outcome}"] = (
            settled.get_sample_value("llmgw_cp_webhooks_total", {"outcome": outcome}) or 0.0
        )
    return found


async def _run(gw: Gateway, prompt: str, stream: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """One stream of `prompt`, streamed or whole; the metrics' moves and its record."""
    access = await gw.new_user()
    grant = await gw.init_ok(access, {"query": prompt, "max_tokens": 200})
    before = snapshot(gw)
    if stream:
        async with opened(await gw.get(grant["stream_url"])) as response:
            await events(response)
    else:
        body = {"stream": False, "messages": [{"role": "user", "content": prompt}]}
        await gw.complete(grant["stream_token"], body)
    return await until_reported(gw, access, grant, before)


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
    assert_once(moved, record, errors)


async def until_reported(
    gw: Gateway, access: str, grant: dict[str, Any], before: dict[str, float], edge: str = "edge"
) -> tuple[dict[str, float], dict[str, Any]]:
    """The stream's usage record once settled and its delivery counted; what the
    metrics moved since `before`."""
    record = await gw.wait_usage(access, grant["reservation_id"])
    await eventually(lambda: gw.edge_state(edge).reports_owed == 0, "every report made")
    await eventually(
        lambda: snapshot(gw, edge)["delivered"] > before["delivered"], "the delivery counted"
    )
    after = snapshot(gw, edge)
    return {k: after[k] - before[k] for k in after}, record


def assert_once(moved: dict[str, float], record: dict[str, Any], errors: int) -> None:
    assert moved["active"] == 0  # else a phantom stream on the operator's dashboard
    assert moved[record["status"]] == 1
    assert sum(moved[s] for s in ("completed", "cancelled", "failed", "revoked")) == 1
    assert (moved["input"], moved["output"]) == (record["input_tokens"], record["output_tokens"])
    assert moved["errors"] == errors
    # Its report delivered once and settled once.
    assert (moved["delivered"], moved["retry"], moved["rejected"]) == (1, 0, 0)
    assert (moved["cp_settled"], moved["cp_duplicate"]) == (1, 0)


@on_loop
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_a_client_leaving_while_the_backend_opens_moves_the_metrics_once(
    gw: Gateway, stream: bool
) -> None:
    access = await gw.new_user()
    messages = [{"role": "user", "content": "left early [[mock tokens=40]]"}]
    grant = await gw.init_ok(access, {"messages": messages})
    body = {"model": "mock-fast", "messages": messages, "stream": stream}
    before = snapshot(gw)
    async with scenario.backend_headers_stalled(gw) as faults:
        client = await scenario.ask_until_the_backend_stalls(gw, faults, grant, body)
        assert snapshot(gw)["active"] == before["active"] + 1  # opening: active
        await scenario.leave(client)
        moved, record = await until_reported(gw, access, grant, before, "edge")
    assert record["status"] == "cancelled"
    assert_once(moved, record, errors=0)


@on_loop
async def test_a_whole_answer_revoked_in_progress_moves_the_metrics_once(gw: Gateway) -> None:
    access = await gw.new_user()
    grant = await gw.init_ok(access, {"messages": scenario.LONG_ANSWER})
    before = snapshot(gw)
    status, _ = await scenario.revoke_a_whole_answer_midway(gw, grant)
    assert status == 401
    moved, record = await until_reported(gw, access, grant, before, "edge")
    assert record["status"] == "revoked"
    assert_once(moved, record, errors=0)


@on_loop
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_the_maximum_life_reached_while_opening_moves_the_metrics_once(
    gw: Gateway, stream: bool
) -> None:
    """Before, a backend that had not answered its headers when the stream's maximum
    life ran out was counted in no `llmgw_edge_upstream_errors_total` (measured: 0),
    though the same backend past the upstream read timeout counts one
    `upstream_timeout`, and the relay counts the same life running out once the
    backend answers."""
    name = f"short-{int(stream)}"
    await gw.add_edge(name)
    state = gw.edge_state(name)
    state.settings = dataclasses.replace(state.settings, max_stream_seconds=0.5)
    access = await gw.new_user()
    messages = [{"role": "user", "content": "slow to answer [[mock tokens=5]]"}]
    grant = await gw.init_ok(access, {"messages": messages})
    body = {"model": "mock-fast", "messages": messages, "stream": stream}
    before = snapshot(gw, name)
    async with scenario.backend_headers_stalled(gw), asyncio.timeout(5):  # the life is 0.5 s
        status, _ = await gw.complete(grant["stream_token"], body, edge=name)
    assert status == 504
    moved, record = await until_reported(gw, access, grant, before, name)
    assert record["status"] == "failed"
    assert_once(moved, record, errors=1)


@on_loop
@pytest.mark.parametrize("when", ["opening", "reporting"])
async def test_a_server_cancellation_moves_the_metrics_once(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """The server cancels a whole answer's request once its graceful time is over
    (uvicorn's `task.cancel()`): while the backend opens (a `failed` report, no
    backend error: the edge stopped) or while the report goes to the store (the
    report runs on in its own task: counted once, `completed`)."""
    reached, go_on = asyncio.Event(), asyncio.Event()
    if when == "reporting":
        reached, go_on = scenario.slow_report_store(gw, monkeypatch)
    access = await gw.new_user()
    messages = [{"role": "user", "content": "cut by the server [[mock tokens=40]]"}]
    grant = await gw.init_ok(access, {"messages": messages})
    body = {"model": "mock-fast", "messages": messages, "stream": False}
    before = snapshot(gw)
    async with scenario.backend_headers_stalled(gw, 1 if when == "opening" else 0) as faults:
        asking = asyncio.create_task(gw.complete(grant["stream_token"], body))
        await (reached.wait() if when == "reporting" else faults.stalled.wait())
        await scenario.cancel_as_the_server(gw, asking, go_on)
        monkeypatch.undo()
        moved, record = await until_reported(gw, access, grant, before, "edge")
    assert record["status"] == ("completed" if when == "reporting" else "failed")
    assert_once(moved, record, errors=0)
