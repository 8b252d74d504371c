"""The largest stream token the control plane mints passes every edge: an edge takes
header blocks of at least `MIN_HEADER_BYTES` (`LLMGW_MAX_HEADER_BYTES`), and init
refuses, before its hold, a model whose sealed routes (the company's key pool, once
for the model and once for each fallback it keys) would make a larger token."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import uvicorn
from cryptography.fernet import Fernet

from control_plane.company_llm import merge_model, route_for
from control_plane.settings import ControlPlaneSettings
from llm_gateway.http_guard import http_protocol
from llm_gateway.servers import limits_of
from shared.route_claim import (
    SEALED_ROUTES_MAX_BYTES,
    UpstreamRoute,
    route_ciphers,
    seal,
    sealed_length,
    unseal,
)
from shared.settings import MIN_HEADER_BYTES, ConfigError
from shared.sse import ServerSentEvent, SSEDecoder
from shared.tokens import STREAM_TOKEN_MAX_BYTES
from stream_edge.settings import EdgeSettings
from tests.conftest import new_webhook_secret
from tests.harness import bind_free_socket, url_of
from tests.stack import Client, InProcessStack, base_env

# A browser's EventSource request beside the token: a long Referer (Chrome keeps
# 4 KiB of it), its client hints, a language list, a few cookies of the edge's domain.
BROWSER_HEADERS = {
    "Accept": "text/event-stream",
    "Cache-Control": "no-cache",
    "Origin": "https://app.example.com",
    "Referer": "https://app.example.com/chat?" + "q" * 4000,
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Accept-Language": "en-GB,en;q=0.9,fr;q=0.8,de;q=0.7,it;q=0.6,es;q=0.5",
    "sec-ch-ua": '"Google Chrome";v="131", "Chromium";v="131", "Not_A Brand";v="24"',
    "sec-ch-ua-mobile": "?0",
    "sec-ch-ua-platform": '"Linux"',
    "Sec-Fetch-Dest": "empty",
    "Sec-Fetch-Mode": "cors",
    "Sec-Fetch-Site": "same-site",
    "Cookie": "; ".join(f"c{i}={'v' * 200}" for i in range(10)),
}
IDS = [f"{i}" + "m" * 199 for i in range(6)]  # model ids at their longest


def _model(fallbacks: list[str], upstream_model: str = "u" * 1000) -> dict[str, Any]:
    """A company model with every field its sealed route carries at its longest (the
    one that serves is named as the mock backend knows it)."""
    return {
        "upstream_model": upstream_model,
        "context_length": 2**31 - 1,
        "max_output_tokens": 2**31 - 1,
        "features": ["streaming", "tools", *(f"{i:02d}" + "f" * 30 for i in range(14))],
        "image_input_tokens": 2**31 - 1,
        "price": {"input_per_mtok": 1, "output_per_mtok": 1},
        "fallbacks": fallbacks,
    }


MODELS = {IDS[0]: _model(IDS[1:], "mock-fast")} | {i: _model([]) for i in IDS[1:]}


def _pool(first: int) -> list[str]:
    # Two keys: the first is sealed twice (`api_key` and first of `api_keys`).
    return ["k" * first, "j"]


def _largest_first_key(stack: InProcessStack) -> int:
    """The longest first key of `_pool` whose six sealed routes fit the budget."""
    catalog = stack.settings.catalog

    def sealed(first: int) -> int:
        pool = tuple(_pool(first))
        specs = [merge_model(None, i, "mock", m) for i, m in MODELS.items()]
        routes = [route_for(catalog, spec, pool[0], pool) for spec in specs]
        return sum(sealed_length(route) for route in routes if route is not None)

    return max(n for n in range(1, 4096) if sealed(n) <= SEALED_ROUTES_MAX_BYTES)


def _configure(c: Client, owner: str, company: str, first: int) -> httpx.Response:
    path = f"/v1/admin/companies/{company}/providers/mock"
    return c.as_user(owner, "PUT", path, json={"api_keys": _pool(first), "models": MODELS})


def _key_ids(c: Client, owner: str, company: str) -> list[str]:
    view = c.as_user(owner, "GET", f"/v1/admin/companies/{company}/providers").json()
    [mock] = [v for v in view["data"]["items"] if v["provider"] == "mock"]
    return [key["id"] for key in mock["keys"]]


INIT = {"model": IDS[0], "query": "hi [[mock tokens=3]]", "max_tokens": 16}


@contextlib.contextmanager
def guarded(stack: InProcessStack) -> Iterator[str]:
    """The stack's edge behind the services' own protocol and its limits
    (`http_guard`, as `llm-gateway edge` serves it; the test harness serves plain
    uvicorn), on the stack's event loop, its lifespan already run: its URL."""
    assert stack.group.loop is not None
    sock = bind_free_socket()
    config = uvicorn.Config(
        stack.edge,
        http=http_protocol(limits_of(stack.edge_settings)),
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    serving = asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), stack.group.loop)
    try:
        for _ in range(500):
            if server.started or serving.done():
                break
            time.sleep(0.01)
        assert server.started, "the guarded edge did not start"
        yield url_of(sock)
    finally:
        server.should_exit = True
        serving.result(timeout=10)
        sock.close()


def status_over_a_network(url: str, headers: dict[str, str]) -> int:
    """The status of `GET url` sent as a network delivers it: in segments of one
    Ethernet MSS. The header cap counts the reads before the block's end: a whole
    block in one read (loopback, one `sendall`) is never counted against it."""
    parts = urlsplit(url)
    lines = [f"GET {parts.path}?{parts.query} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join([*lines, "Connection: close"]) + "\r\n\r\n").encode()
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(request), 1448):
            try:
                sock.sendall(request[start : start + 1448])
            except OSError:  # the server answered and closed early (a 431)
                break
            time.sleep(0.001)  # pacing only: what is asserted is the answer
        head = sock.recv(64)
    return int(head.split(b" ")[1])


@pytest.mark.parametrize("value", ["1024", "4096", str(MIN_HEADER_BYTES - 1)])
def test_a_header_cap_below_the_largest_token_is_refused_at_start(value: str) -> None:
    env = {"LLMGW_WEBHOOK_SECRET": new_webhook_secret(), "LLMGW_MAX_HEADER_BYTES": value}
    for settings in (EdgeSettings, ControlPlaneSettings):
        with pytest.raises(ConfigError, match="LLMGW_MAX_HEADER_BYTES must be between") as e:
            settings.from_env(env)
        assert "\n" not in str(e.value) and str(MIN_HEADER_BYTES) in str(e.value)
        assert "stream token" in str(e.value)
    env["LLMGW_MAX_HEADER_BYTES"] = str(MIN_HEADER_BYTES)
    assert EdgeSettings.from_env(env).max_header_bytes == MIN_HEADER_BYTES


def test_the_largest_mintable_token_passes_an_edge_at_the_least_header_block(
    tmp_path: Path,
) -> None:
    """Measured before: a pool of 4,096 characters (keys of 4,095 and 1) and five
    fallbacks on its provider minted a 109,344-byte token; an edge at the default
    64 KiB answered 431 to every stream of the model (and at the least allowed,
    1,024 bytes, to every stream of a company with any key), and httpx refused the
    `stream_url` itself (URL too long), after init had taken the hold."""
    env = {
        **base_env(f"sqlite:///{tmp_path}/gw.db"),
        "LLMGW_MAX_HEADER_BYTES": str(MIN_HEADER_BYTES),
    }
    with InProcessStack(env) as stack:
        c = stack.client
        company = c.new_company("100")
        owner = c.new_user(company, role="owner")
        first = _largest_first_key(stack)
        assert _configure(c, owner, company, first).status_code == 200
        grant = c.init_ok(owner, INIT)
        assert STREAM_TOKEN_MAX_BYTES - 4096 < len(grant["stream_token"]) <= STREAM_TOKEN_MAX_BYTES
        assert stack.edge_settings.max_header_bytes == MIN_HEADER_BYTES
        with guarded(stack) as edge:
            parts = urlsplit(grant["stream_url"])
            url = f"{edge}{parts.path}?{parts.query}"
            assert status_over_a_network(url, BROWSER_HEADERS) == 200
            # With as many bytes more of headers as the block is under the cap, it
            # is over: the sending above is one the cap counts.
            padded = {**BROWSER_HEADERS, "X-Pad": "p" * (MIN_HEADER_BYTES - len(url))}
            assert status_over_a_network(url, padded) == 431
        grant = c.init_ok(owner, INIT)
        decoder, got = SSEDecoder(), list[ServerSentEvent]()
        with c.http.stream("GET", grant["stream_url"], headers=BROWSER_HEADERS) as response:
            assert response.status_code == 200, response.read()[:200]
            for raw in response.iter_raw():
                got.extend(decoder.feed(raw))
        assert got[-1].event == "complete"
        # The OpenAI-style call: the token in `Authorization`, the SDK's own headers.
        grant = c.init_ok(owner, INIT)
        answer = c.http.post(
            f"{c.edge_url}/v1/chat/completions",
            headers={
                "Authorization": f"Bearer {grant['stream_token']}",
                **{f"X-Stainless-{n}": "v" * 40 for n in ("Lang", "Os", "Arch", "Runtime")},
            },
            json={"messages": [{"role": "user", "content": "hi [[mock tokens=3]]"}]},
        )
        assert answer.status_code == 200, answer.text[:200]

        # One block more of key: refused where the owner sets it, nothing changed.
        kept = _key_ids(c, owner, company)
        for longer in (first + 16, 4095):
            refused = _configure(c, owner, company, longer)
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["code"] == "validation_error"
            assert refused.json()["message"].startswith("api_keys: ")
            assert "shorten the key pool" in refused.json()["message"]
            assert _key_ids(c, owner, company) == kept
        c.init_ok(owner, INIT)


def _catalog_grown_past_the_budget(tmp_path: Path) -> tuple[dict[str, str], str, str]:
    """A company's owner stores a mock key pool whose token fits; then the catalog
    gives mock-fast two fallbacks the pool keys too (its token past the budget).
    Returns the environment serving that catalog, the owner, and the company."""
    env = base_env(f"sqlite:///{tmp_path}/gw.db")
    with InProcessStack(env) as stack:
        c = stack.client
        company = c.new_company("100")
        owner = c.new_user(company, role="owner")
        path = f"/v1/admin/companies/{company}/providers/mock"
        put = c.as_user(owner, "PUT", path, json={"api_keys": _pool(3900)})
        assert put.status_code == 200, put.text
    packaged = (Path(__file__).parent.parent / "shared" / "models.yaml").read_text()
    models = tmp_path / "models.yaml"
    models.write_text(
        packaged.replace(
            "    upstream_model: mock-fast\n",
            "    upstream_model: mock-fast\n    fallbacks: [mock-chat, mock-vision]\n",
            1,
        )
    )
    return {**env, "LLMGW_MODELS_FILE": str(models)}, owner, company


def test_a_token_grown_past_the_budget_by_the_catalog_is_refused_at_init(
    tmp_path: Path,
) -> None:
    """An operator gives a packaged model fallbacks after a company stored a long
    key for their provider (no owner's PUT to refuse it): init refuses that model
    with 422 before its hold; the company's other models still stream."""
    env, owner, _ = _catalog_grown_past_the_budget(tmp_path)
    with InProcessStack(env) as stack:
        c = stack.client
        before = c.credits(owner)
        refused = c.init(owner, {"model": "mock-fast", "query": "hi", "max_tokens": 16})
        assert refused.status_code == 422, refused.text
        assert refused.json()["message"].startswith("model: 'mock-fast' with its fallbacks")
        assert c.credits(owner) == before
        c.init_ok(owner, {"model": "mock-chat", "query": "hi", "max_tokens": 16})


def test_a_change_that_grows_no_token_is_taken_when_the_catalog_grew_one_past_the_budget(
    tmp_path: Path,
) -> None:
    """After the catalog grew a model's token past the budget (as above), an owner's
    PUT that makes no token larger is taken: rotating a leaked key for one of the
    same length, another provider's key, the default model. Before, every PUT of
    the company was 422 naming api_keys, the rotation of a leaked key with it."""
    env, owner, company = _catalog_grown_past_the_budget(tmp_path)
    with InProcessStack(env) as stack:
        path = f"/v1/admin/companies/{company}/providers/mock"
        c = stack.client
        rotated = c.as_user(owner, "PUT", path, json={"api_keys": ["r" * 3900, "j"]})
        assert rotated.status_code == 200, rotated.text
        other = f"/v1/admin/companies/{company}/providers/openai"
        keyed = c.as_user(owner, "PUT", other, json={"api_keys": ["sk-" + "o" * 48]})
        assert keyed.status_code == 200, keyed.text
        default = c.as_user(owner, "PUT", path, json={"default_model": "mock-chat"})
        assert default.status_code == 200, default.text
        # A longer pool still grows the model's token past the budget: refused.
        longer = c.as_user(owner, "PUT", path, json={"api_keys": ["r" * 3999, "j"]})
        assert longer.status_code == 422, longer.text
        assert longer.json()["message"].startswith("api_keys: ")
        # The model itself is still refused at init, before its hold.
        refused = c.init(owner, {"model": "mock-fast", "query": "hi", "max_tokens": 16})
        assert refused.status_code == 422, refused.text


def test_the_budget_keeps_the_token_and_its_url_under_the_clients_limits() -> None:
    # The sealed routes and 4 KiB of other claims, in base64url, with the header and
    # the signature: within the token's bound.
    assert (SEALED_ROUTES_MAX_BYTES + 4096) * 4 // 3 + 300 <= STREAM_TOKEN_MAX_BYTES
    # httpx (the OpenAI SDK's client) refuses a URL over 64 KiB.
    assert STREAM_TOKEN_MAX_BYTES + 200 < httpx._urlparse.MAX_URL_LENGTH
    assert MIN_HEADER_BYTES >= STREAM_TOKEN_MAX_BYTES + 16 * 1024


@pytest.mark.parametrize("key_length", [1, 15, 16, 17, 100, 1172, 4095])
def test_sealed_length_is_the_sealed_claims_length(key_length: int) -> None:
    cipher = route_ciphers([Fernet.generate_key().decode()])
    route = UpstreamRoute("p", "openai_chat", "http://x/v1", "m", "k" * key_length)
    assert sealed_length(route) == len(seal(route, cipher))


def test_init_measures_and_seals_a_route_without_asdicts_deep_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every init of a company on its own keys measures each route it seals
    # (`fallbacks.check_token_room`) and seals it: `dataclasses.asdict` deep-copies
    # the key pool's tuple for each (measured 22-37 µs a route, against 1-3 µs for
    # orjson's own dataclass writer), on the path issue 14 fights for.
    cipher = route_ciphers([Fernet.generate_key().decode()])
    route = UpstreamRoute(
        "p", "openai_chat", "http://x/v1", "m", "k" * 51, ("streaming", "tools"), 85, 128_000,
        tuple("k" * 51 for _ in range(3)),
    )  # fmt: skip
    plain = orjson.dumps(dataclasses.asdict(route))

    def deep_copy(*_: object, **__: object) -> dict[str, Any]:
        raise AssertionError("dataclasses.asdict on init's path")

    monkeypatch.setattr(dataclasses, "asdict", deep_copy)
    monkeypatch.setattr("shared.route_claim.asdict", deep_copy, raising=False)
    sealed = seal(route, cipher)
    assert sealed_length(route) == len(sealed)
    # The same bytes as before, so every edge opens it as it did.
    assert cipher.decrypt(sealed.encode()) == plain
    assert unseal(sealed, cipher) == route
