"""`deploy/nginx/edge.conf` in front of a real edge: nginx accepts it, and a stream
through it reaches the client chunk by chunk, not in one piece at the end.

The edge and the rest of the gateway run in-process (SQLite + memory); nginx is the
real binary, started by the test with its files in tmp_path, under an `http {}` block
that compresses event streams (as a site-wide config might). Three things keep the
stream flowing — the edge's `X-Accel-Buffering: no`, `proxy_buffering off` and
`gzip off` — and each of the first two is shown to suffice alone; a control run with
all of them removed shows that the test notices a proxy that buffers.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from shared.tokens import STREAM_TOKEN_MAX_BYTES
from tests.harness import free_port
from tests.ops_processes import ROOT, ProcessStack, require_tool, sse_events
from tests.stack import InProcessStack, base_env

CONF = ROOT / "deploy" / "nginx" / "edge.conf"


# What a site-wide nginx config might well say; the shipped location must hold up.
HOSTILE_HTTP = "gzip on; gzip_types text/event-stream; gzip_min_length 0;"
# Which of the three defences against buffering a variant keeps.
VARIANTS = {
    "shipped": {},
    "edge header only": {
        "gzip off;": "",
        "proxy_buffering off;": "proxy_buffering on;",
    },
    "proxy_buffering off only": {
        "gzip off;": "",
        "proxy_buffering off;": "proxy_buffering off; proxy_ignore_headers X-Accel-Buffering;",
    },
    "none": {
        "gzip off;": "",
        "proxy_buffering off;": "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;",
    },
}


def render(tmp: Path, edge_port: int, port: int, variant: str = "shipped") -> Path:
    """A runnable copy of edge.conf: our addresses, files under `tmp`, and a main
    config around it (the shipped file is an `http {}` include)."""
    text = CONF.read_text()
    text = text.replace("server stream-edge:8001", f"server 127.0.0.1:{edge_port}")
    text = re.sub(r"listen 8080;", f"listen 127.0.0.1:{port};", text)
    text = text.replace("/var/log/nginx/access.log", str(tmp / "access.log"))
    for old, new in VARIANTS[variant].items():
        assert old in text
        text = text.replace(old, new)
    (tmp / "edge.conf").write_text(text)
    temp_dirs = "\n".join(
        f"    {kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = tmp / "nginx.conf"
    main.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"worker_processes 1;\npid {tmp / 'nginx.pid'};\nerror_log {tmp / 'error.log'} info;\n"
        + "events { worker_connections 256; }\n"
        + f"http {{\n{temp_dirs}\n    {HOSTILE_HTTP}\n    include {tmp / 'edge.conf'};\n}}\n"
    )
    return main


def nginx_cmd(main: Path, *extra: str) -> list[str]:
    """nginx on `main`, with its prefix and error log in the test's directory."""
    tmp = main.parent
    return [
        require_tool("nginx"),
        "-c",
        str(main),
        "-p",
        str(tmp),
        "-e",
        str(tmp / "error.log"),
        *extra,
    ]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessStack]:
    path = tmp_path_factory.mktemp("nginx-db") / "gateway.db"
    with InProcessStack(base_env(f"sqlite:///{path}")) as running:
        yield running


def start_nginx(main: Path, port: int) -> subprocess.Popen[bytes]:
    with (main.parent / "nginx.out").open("wb") as out:
        process = subprocess.Popen(nginx_cmd(main, "-g", "daemon off;"), stderr=out, stdout=out)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert process.poll() is None, (main.parent / "nginx.out").read_text()
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.05)
    process.kill()
    raise AssertionError("nginx did not start")


def edge_port(stack: InProcessStack) -> int:
    return int(stack.client.edge_url.rsplit(":", 1)[1])


def test_nginx_accepts_the_shipped_config(tmp_path: Path, stack: InProcessStack) -> None:
    main = render(tmp_path, edge_port(stack), free_port())
    result = subprocess.run(nginx_cmd(main, "-t"), capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    assert "syntax is ok" in result.stderr.decode()


def stream_through(stack: InProcessStack, tmp: Path, variant: str) -> list[float]:
    """Arrival times (s after the request) of a 10-token, 100 ms-per-token stream."""
    port = free_port()
    process = start_nginx(render(tmp, edge_port(stack), port, variant), port)
    try:
        c = stack.client
        token = c.new_user(c.new_company("5"))
        grant = c.init_ok(token, {"query": "slowly [[mock tokens=10 delay_ms=100]]"})
        url = grant["stream_url"].replace(c.edge_url, f"http://127.0.0.1:{port}")
        started = time.monotonic()
        arrivals = []
        with c.http.stream("GET", url, headers={"Accept-Encoding": "gzip"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            if variant == "shipped":  # never compressed, whatever the http block says
                assert "content-encoding" not in response.headers
            for name, _, at in sse_events(response):
                if name == "chunk":
                    arrivals.append(at - started)
        assert len(arrivals) == 10
        return arrivals
    finally:
        process.terminate()
        process.wait(timeout=10)


def spread_out(arrivals: list[float]) -> bool:
    """The tokens came as the backend produced them (9 gaps of 100 ms), not at once."""
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return arrivals[-1] - arrivals[0] > 0.6 and sum(gap > 0.05 for gap in gaps) >= 6


def test_a_stream_through_nginx_arrives_chunk_by_chunk(
    tmp_path: Path, stack: InProcessStack
) -> None:
    arrivals = stream_through(stack, tmp_path, "shipped")
    assert spread_out(arrivals), arrivals
    assert arrivals[0] < 0.5, arrivals  # the first token long before the last
    # nginx's access log has the path, never the token in its query string.
    log = (tmp_path / "access.log").read_text()
    assert 'GET /v1/stream HTTP/1.1" 200' in log and "token" not in log


@pytest.mark.parametrize("variant", ["edge header only", "proxy_buffering off only"])
def test_each_defence_alone_keeps_the_stream_flowing(
    tmp_path: Path, stack: InProcessStack, variant: str
) -> None:
    """`X-Accel-Buffering: no` from the edge and `proxy_buffering off` are each
    effective on their own, even with compression switched on for event streams."""
    assert spread_out(stream_through(stack, tmp_path, variant))


def test_a_buffering_proxy_would_be_noticed(tmp_path: Path, stack: InProcessStack) -> None:
    """With both defences gone nginx holds the whole stream back until the end — so
    the checks above would catch a config that buffers."""
    arrivals = stream_through(stack, tmp_path, "none")
    assert not spread_out(arrivals), arrivals
    assert arrivals[0] > 0.8, arrivals


def test_the_proxy_does_not_publish_metrics(tmp_path: Path, stack: InProcessStack) -> None:
    """Prometheus scrapes the edges directly; through the public proxy `/metrics`, in
    any spelling nginx normalises, is a 404 while the edge behind it still answers."""
    port = free_port()
    process = start_nginx(render(tmp_path, edge_port(stack), port), port)
    try:
        proxy = f"http://127.0.0.1:{port}"
        assert stack.client.http.get(f"{stack.client.edge_url}/metrics").status_code == 200
        assert stack.client.http.get(f"{proxy}/healthz").status_code == 200
        for path in ("/metrics", "/metrics?format=text", "//metrics", "/./metrics", "/%6Detrics"):
            # httpx would normalise the path; a raw request line sends it as written.
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(
                    f"GET {path} HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n".encode()
                )
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 404 "), (path, answer[:80])
            assert b"llmgw_" not in answer, path
        # A trailing slash goes through to the edge, which only redirects to /metrics.
        slash = stack.client.http.get(f"{proxy}/metrics/")
        assert slash.status_code != 200 and "llmgw_" not in slash.text
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_proxy_passes_the_largest_stream_token(tmp_path: Path, stack: InProcessStack) -> None:
    """A stream token may take `STREAM_TOKEN_MAX_BYTES` (a company's key pool and
    fallbacks sealed in it), in `?token=` for EventSource or in `Authorization`: the
    proxy passes both to the edge, which judges the token (here 401, a forged one),
    instead of nginx's own 414 / 400 at its default 8 KiB header buffers."""
    port = free_port()
    process = start_nginx(render(tmp_path, edge_port(stack), port), port)
    try:
        proxy = f"http://127.0.0.1:{port}"
        token = "e" * (STREAM_TOKEN_MAX_BYTES - 2)
        by_query = stack.client.http.get(f"{proxy}/v1/stream?token={token}")
        by_header = stack.client.http.post(
            f"{proxy}/v1/chat/completions",
            headers={"Authorization": f"Bearer {token}"},
            json={"model": "mock-fast", "messages": [{"role": "user", "content": "hi"}]},
        )
        for answer in (by_query, by_header):
            assert answer.status_code == 401, (answer.status_code, answer.text[:200])
            assert "x-request-id" in answer.headers  # the edge's answer, not nginx's
    finally:
        process.terminate()
        process.wait(timeout=10)


# --- The client address behind the proxy (login limits) ------------------------

# Where the proxy connects from, as a containerised control plane sees it: not
# loopback (compose's published port arrives from the bridge's gateway; an ingress
# controller from its pod address).
PROXY_ADDRESS = "127.0.0.5"


def compose_env(service: str, dotenv: dict[str, str]) -> dict[str, str]:
    """What compose puts in `service`'s environment when deploy/.env holds `dotenv`
    (`${VAR}`, `${VAR:-default}` and `${VAR:?message}` substituted)."""
    doc = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())

    def value(match: re.Match[str]) -> str:
        name, op, default = match.group(1), match.group(2), match.group(3)
        if name in dotenv:
            return dotenv[name]
        return default if op == ":-" else ""

    pattern = re.compile(r"\$\{([A-Z_]+)(?:(:-|:\?)([^}]*))?\}")
    environment = doc["services"][service]["environment"]
    return {name: pattern.sub(value, str(raw)) for name, raw in environment.items()}


def login_from(proxy: str, source: str, email: str, password: str, spoof: str) -> int:
    """A login through the proxy from the client address `source`, claiming to be
    `spoof` in its own X-Forwarded-For."""
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=30) as client:
        response = client.post(
            f"{proxy}/v1/auth/login",
            json={"email": email, "password": password},
            headers={"X-Forwarded-For": spoof},
        )
    return response.status_code


@pytest.mark.postgres
def test_behind_the_proxy_each_client_has_its_own_login_limit(
    tmp_path: Path, pg_database_url: str, redis_prefix: str
) -> None:
    """The control plane behind a proxy (docs/operations.md: the edge's config, the
    same `/metrics` refusal) as compose runs it, with the proxy's address in
    deploy/.env's FORWARDED_ALLOW_IPS. An attacker's failed logins must lock out
    only the attacker, whatever X-Forwarded-For it sends: not every client of the
    proxy (which all shared the proxy's one address), and not nobody (a fresh
    spoofed address per guess)."""
    forwarded = compose_env("control-plane", {"FORWARDED_ALLOW_IPS": PROXY_ADDRESS})
    limit = 3
    overrides = {"LLMGW_LOGIN_FAILURES_PER_15MIN": str(limit)}
    if "FORWARDED_ALLOW_IPS" in forwarded:
        overrides["FORWARDED_ALLOW_IPS"] = forwarded["FORWARDED_ALLOW_IPS"]
    stack = ProcessStack(tmp_path, pg_database_url, redis_prefix, **overrides)
    with stack:
        port = free_port()
        main = render(tmp_path, int(stack.urls["cp"].rsplit(":", 1)[1]), port)
        conf = tmp_path / "edge.conf"
        conf.write_text(
            conf.read_text().replace(
                "proxy_pass http://llmgw_stream_edge;",
                f"proxy_pass http://llmgw_stream_edge;\n        proxy_bind {PROXY_ADDRESS};",
            )
        )
        process = start_nginx(main, port)
        try:
            proxy = f"http://127.0.0.1:{port}"
            c = stack.client
            company = c.new_company("1")
            emails = []
            for _ in range(2):
                email = f"xff-{uuid.uuid4().hex[:8]}@example.com"
                c.admin(
                    "POST",
                    "/v1/admin/users",
                    json={"company_id": company, "email": email, "password": "pw-123456"},
                )
                emails.append(email)
            # The attacker guesses other accounts' passwords, a new spoofed address
            # and a new email each time (the per-email limit never trips).
            answers = [
                login_from(proxy, "127.0.0.2", f"guess-{n}@example.com", "wrong", f"10.9.8.{n}")
                for n in range(limit + 2)
            ]
            assert answers[:limit] == [401] * limit, answers
            assert answers[limit:] == [429, 429], answers  # its own address is over
            # Another client of the same proxy still signs in.
            assert login_from(proxy, "127.0.0.3", emails[0], "pw-123456", "10.9.8.0") == 200
        finally:
            process.terminate()
            process.wait(timeout=10)


def test_the_proxy_lets_idle_connections_go_before_the_edge_does() -> None:
    """nginx kept an idle connection to the edge for 60 s (its default) while the edge
    closes one after its keep-alive timeout: a POST sent on a connection the edge was
    closing came back 502, never retried on another (a POST is not idempotent)."""
    from llm_gateway.servers import server_for

    edge_keeps = server_for(object(), "127.0.0.1", 0).config.timeout_keep_alive
    upstream = re.search(r"upstream llmgw_stream_edge \{(.*?)\n\}", CONF.read_text(), re.S)
    assert upstream is not None
    timeout = re.search(r"^\s*keepalive_timeout\s+(\d+)s;", upstream.group(1), re.M)
    assert timeout is not None, "no keepalive_timeout in the upstream block (60 s)"
    assert int(timeout.group(1)) < edge_keeps
