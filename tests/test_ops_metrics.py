"""Every DESIGN §8 metric, checked against real traffic on real processes.

The services run as operators run them — separate `llm-gateway` processes with two
uvicorn workers each (prometheus-client's multiprocess mode) on PostgreSQL + Redis —
so the values checked are the sums over workers that a scrape of any one worker
reports. The numbers must agree with what clients saw and with the ledger: output
tokens counted = content tokens streamed, credits reserved = holds taken, charged +
released = reserved, one settlement per stream. `promtool check metrics` must accept
both services' output.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from control_plane.metrics import Metrics
from shared.metrics import exposition
from stream_edge.metrics import TTFT_BUCKETS, EdgeMetrics
from tests.ops_processes import ProcessStack, Scrape, require_tool, scrape, sse_events
from tests.stack import Client

DESIGN = Path(__file__).resolve().parents[2] / "shared" / "DESIGN.md"
EDGE_METRICS = {
    "llmgw_edge_streams_active": "gauge",
    "llmgw_edge_streams_total": "counter",
    "llmgw_edge_time_to_first_token_seconds": "histogram",
    "llmgw_edge_stream_duration_seconds": "histogram",
    "llmgw_edge_relay_delay_seconds": "histogram",
    "llmgw_edge_tokens_total": "counter",
    "llmgw_edge_token_rejections_total": "counter",
    "llmgw_edge_upstream_errors_total": "counter",
    "llmgw_edge_webhook_deliveries_total": "counter",
    "llmgw_edge_outbox_pending": "gauge",
}
CP_METRICS = {
    "llmgw_cp_http_requests_total": "counter",
    "llmgw_cp_http_request_duration_seconds": "histogram",
    "llmgw_cp_chat_inits_total": "counter",
    "llmgw_cp_credits_reserved_total": "counter",
    "llmgw_cp_credits_charged_total": "counter",
    "llmgw_cp_credits_released_total": "counter",
    "llmgw_cp_holds_active": "gauge",
    "llmgw_cp_webhooks_total": "counter",
    "llmgw_cp_reconciliation_lag_seconds": "histogram",
}
# shared/tokens.py's reasons, plus the edge's own (stream_edge/admission.py).
TOKEN_REASONS = {
    "malformed",
    "bad_algorithm",
    "unknown_kid",
    "expired",
    "not_yet_valid",
    "bad_audience",
    "bad_issuer",
    "bad_signature",
    "missing",
    "used",
    "revoked",
    "insufficient_scope",
    "keys_unavailable",
}
ID_LIKE = re.compile(r"[0-9a-f]{16,}|[0-9a-f]{8}-[0-9a-f]{4}-", re.IGNORECASE)


def promtool_check(text: str) -> None:
    result = subprocess.run(
        [require_tool("promtool"), "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def declared_type(text: str, name: str) -> str | None:
    """The `# TYPE` of family `name` (counters are declared with or without `_total`)."""
    declared = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    return declared.get(name) or declared.get(name.removesuffix("_total"))


def test_design_lists_exactly_these_metrics() -> None:
    """The tables above are DESIGN §8, so the checks below cover all of it."""
    if not DESIGN.exists():
        pytest.skip("the shared DESIGN.md is not next to the project")
    section = DESIGN.read_text().split("## 8.")[1].split("## 9.")[0]
    named = {re.sub(r"\{.*", "", n) for n in re.findall(r"`(llmgw_[a-z_]+)", section)}
    expected = {n.removesuffix("_total") for n in {**EDGE_METRICS, **CP_METRICS}}
    assert {n.removesuffix("_total") for n in named} == expected


def test_fresh_registries_pass_promtool_with_fitting_buckets() -> None:
    """Single-process exposition: every family declared, with help, and valid."""
    edge, cp = EdgeMetrics(), Metrics()
    edge.ttft.labels("mock-fast", "mock").observe(0.2)
    edge.streams_total.labels("completed").inc()
    cp.http_requests.labels(route="/v1/me", status="200").inc()
    edge_text = exposition(edge.registry).decode()
    cp_text = cp.render().decode()
    for text, wanted in ((edge_text, EDGE_METRICS), (cp_text, CP_METRICS)):
        promtool_check(text)
        for name, kind in wanted.items():
            assert declared_type(text, name) == kind, name
    # Time to first token from 5 ms to 30 s.
    assert TTFT_BUCKETS[0] == 0.005 and TTFT_BUCKETS[-1] == 30
    assert 'le="0.005"' in edge_text and 'le="30.0"' in edge_text


@pytest.fixture(scope="module")
def traffic(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    """Two workers per service, and a known mix of streams through them."""
    from tests.conftest import fresh_pg_database, fresh_redis_prefix

    server = request.getfixturevalue("pg_server")
    tmp = tmp_path_factory.mktemp("ops-metrics")
    with (
        fresh_pg_database(server) as database_url,
        fresh_redis_prefix() as prefix,
        ProcessStack(
            tmp,
            database_url,
            prefix,
            workers=2,
            LLMGW_UPSTREAM_RETRIES="0",
            LLMGW_SWEEP_INTERVAL_SECONDS="3600",
        ) as stack,
    ):
        yield run_traffic(stack.client) | {"stack": stack}


def _stream(c: Client, token: str, content: str) -> dict[str, Any]:
    """An EventSource stream; returns what the client saw."""
    grant = c.init_ok(
        token, {"model": "mock-fast", "messages": [{"role": "user", "content": content}]}
    )
    seen = {"grant": grant, "chunks": 0, "usage": None, "status": None}
    with c.http.stream("GET", grant["stream_url"], timeout=30) as response:
        if response.status_code != 200:
            seen["status"] = response.status_code
            response.read()
            return seen
        for name, data, _ in sse_events(response):
            if name == "chunk":
                seen["chunks"] += 1
            elif name == "complete":
                seen["usage"] = data["usage"]
            elif name == "error":
                seen["status"] = data["code"]
    return seen


def _completion(c: Client, token: str, content: str) -> dict[str, Any]:
    """A streamed POST /v1/chat/completions with the usage chunk."""
    messages = [{"role": "user", "content": content}]
    grant = c.init_ok(token, {"model": "mock-fast", "messages": messages})
    seen: dict[str, Any] = {"grant": grant, "chunks": 0, "usage": None, "status": None}
    body = {
        "model": "mock-fast",
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {grant['stream_token']}"}
    with c.http.stream(
        "POST", grant["completions_url"], json=body, headers=headers, timeout=30
    ) as response:
        if response.status_code != 200:
            seen["status"] = response.status_code
            response.read()
            return seen
        for line in response.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = orjson.loads(line[5:])
            if "error" in chunk:
                seen["status"] = chunk["error"].get("code")
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    seen["chunks"] += 1
            if chunk.get("usage"):
                usage = chunk["usage"]
                seen["usage"] = {
                    "input_tokens": usage["prompt_tokens"],
                    "output_tokens": usage["completion_tokens"],
                }
    return seen


def run_traffic(c: Client) -> dict[str, Any]:
    company = c.new_company("50")
    token = c.new_user(company)
    runs = [
        *(_stream(c, token, f"stream {i} [[mock tokens={5 + i}]]") for i in range(3)),
        *(_completion(c, token, f"completion {i} [[mock tokens={7 + i}]]") for i in range(2)),
        _stream(c, token, "backend down [[mock fail=500]]"),
        _stream(c, token, "breaks off [[mock tokens=9 error_after=2]]"),
    ]
    rejected = c.http.get(f"{c.edge_url}/v1/stream", params={"token": "not-a-jwt"})
    assert rejected.status_code == 401
    c.as_user(token, "GET", f"/v1/sessions/{uuid.uuid4().hex}")  # a 404 on a templated route
    c.http.get(f"{c.cp_url}/no/such/{uuid.uuid4().hex}")
    usage = [c.wait_usage(token, run["grant"]["reservation_id"]) for run in runs]
    return {"runs": runs, "usage": usage, "token": token}


def settled_scrapes(c: Client, streams: int) -> tuple[Scrape, Scrape]:
    """Scrapes taken once every webhook was delivered and acknowledged."""
    deadline = time.monotonic() + 20
    while True:
        edge, cp = scrape(c.edge_url), scrape(c.cp_url)
        delivered = edge.value("llmgw_edge_webhook_deliveries_total", outcome="delivered")
        if (
            delivered == streams
            and edge.value("llmgw_edge_outbox_pending") == 0
            and cp.value("llmgw_cp_holds_active") == 0
        ):
            return edge, cp
        assert time.monotonic() < deadline, (delivered, edge.value("llmgw_edge_outbox_pending"))
        time.sleep(0.2)


@pytest.mark.postgres
def test_edge_metrics_match_the_traffic(traffic: dict[str, Any]) -> None:
    runs, usage = traffic["runs"], traffic["usage"]
    edge, _ = settled_scrapes(traffic["stack"].client, len(runs))
    statuses = [u["status"] for u in usage]
    assert statuses == ["completed"] * 5 + ["failed", "failed"]
    # Every stream ended and was counted once, by its webhook status.
    assert edge.value("llmgw_edge_streams_active") == 0
    assert edge.value("llmgw_edge_streams_total", status="completed") == 5
    assert edge.value("llmgw_edge_streams_total", status="failed") == 2
    assert edge.value("llmgw_edge_stream_duration_seconds_count") == len(runs)
    # Tokens counted = tokens the clients received = tokens billed.
    streamed = sum(run["chunks"] for run in runs)
    assert streamed == (5 + 6 + 7) + (7 + 8) + 2  # the error came after 2 tokens
    assert edge.value("llmgw_edge_tokens_total", direction="output") == streamed
    assert edge.value("llmgw_edge_tokens_total", direction="output") == sum(
        u["output_tokens"] for u in usage
    )
    assert edge.value("llmgw_edge_tokens_total", direction="input") == sum(
        u["input_tokens"] for u in usage
    )
    for run in runs[:5]:  # the backend's own usage reached the client and the ledger
        assert run["usage"]["output_tokens"] == run["chunks"]
    # First tokens: every stream that produced output, labelled by catalog names only.
    ttft = "llmgw_edge_time_to_first_token_seconds"
    assert edge.value(f"{ttft}_count", model="mock-fast", provider="mock") == 6
    assert edge.label_values(f"{ttft}_count", "model") == {"mock-fast"}
    assert edge.value(f"{ttft}_bucket", le="30.0") == 6
    assert edge.value("llmgw_edge_relay_delay_seconds_count") >= 6
    # Failures: the backend's 500 before the stream, the break-off during it.
    assert edge.value("llmgw_edge_upstream_errors_total", provider="mock") == 2
    assert edge.value("llmgw_edge_token_rejections_total") >= 1
    assert edge.label_values("llmgw_edge_token_rejections_total", "reason") <= TOKEN_REASONS
    assert edge.value("llmgw_edge_webhook_deliveries_total", outcome="rejected") == 0


@pytest.mark.postgres
def test_control_plane_metrics_match_the_ledger(traffic: dict[str, Any]) -> None:
    runs, usage = traffic["runs"], traffic["usage"]
    _, cp = settled_scrapes(traffic["stack"].client, len(runs))
    assert cp.value("llmgw_cp_chat_inits_total", outcome="ok") == len(runs)
    assert cp.value("llmgw_cp_webhooks_total", outcome="settled") == len(runs)
    assert cp.value("llmgw_cp_holds_active") == 0
    assert cp.value("llmgw_cp_reconciliation_lag_seconds_count") == len(runs)
    reserved = sum(Decimal(run["grant"]["reserved_credits"]) for run in runs)
    charged = sum(Decimal(u["cost"]) for u in usage)
    got = {
        kind: Decimal(str(cp.value(f"llmgw_cp_credits_{kind}_total")))
        for kind in ("reserved", "charged", "released")
    }
    assert abs(got["reserved"] - reserved) < Decimal("0.000001")
    assert abs(got["charged"] - charged) < Decimal("0.000001")
    assert abs(got["released"] - (reserved - charged)) < Decimal("0.000001")
    # HTTP metrics: route templates, never raw paths or ids.
    assert cp.value("llmgw_cp_http_requests_total", route="/v1/chat/init", status="201") == len(
        runs
    )
    routes = cp.label_values("llmgw_cp_http_requests_total", "route")
    assert "/v1/sessions/{session_id}" in routes and "unmatched" in routes
    assert not [r for r in routes if ID_LIKE.search(r)], routes
    assert cp.value("llmgw_cp_http_request_duration_seconds_count", route="/v1/chat/init") == len(
        runs
    )


@pytest.mark.postgres
def test_promtool_accepts_both_services_after_traffic(traffic: dict[str, Any]) -> None:
    c: Client = traffic["stack"].client
    for url, wanted in ((c.edge_url, EDGE_METRICS), (c.cp_url, CP_METRICS)):
        text = httpx.get(f"{url}/metrics", timeout=10).text
        promtool_check(text)
        for name, kind in wanted.items():
            assert declared_type(text, name) == kind, name
        # No label carries an id (users, companies, requests, tokens).
        labels = re.findall(r'="([^"]*)"', text)
        assert not [v for v in labels if ID_LIKE.search(v)]


@pytest.mark.postgres
def test_recording_metrics_never_failed(traffic: dict[str, Any]) -> None:
    """Recording a metric must not break what it measures: no error in any worker's log
    (a gauge in the wrong multiprocess mode, say, raises on `inc`)."""
    for name, text in traffic["stack"].logs().items():
        errors = [raw for raw in text.splitlines() if '"level":"error"' in raw]
        assert not errors, f"{name}: {errors[:3]}"
