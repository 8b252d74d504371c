"""`llm-gateway dev` against a website that rebinds its own name to 127.0.0.1 (DNS
rebinding), in Debian's chromium: the apps `dev` serves, on real sockets, with the
demo owner seeded as `dev` seeds it. Never downloads a browser."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.seed import DEMO_EMAIL, seed_demo
from llm_gateway.dev import dev_apps, settings_from_env
from llm_gateway.local_hosts import host_allowed, host_name
from shared.store_memory import MemoryStore
from tests.chromium import launched
from tests.harness import ServerGroup, bind_free_socket, url_of
from tests.stack import base_env
from tests.test_browser import finished_answer, send

REBOUND = "rebound.attacker.test"

# The attacker's page, as its own server sent it before the name moved to 127.0.0.1.
# Chromium's Private Network Access refuses its own fetches to loopback, so it opens
# a popup on one of the gateway's paths (a document loaded from loopback, the same
# origin as the page) and fetches through that.
ATTACK = """<!doctype html><title>cute cats</title><script>
(async () => {
  const out = {};
  const w = window.open('/healthz');
  for (let i = 0; i < 200; i++) {
    await new Promise((r) => setTimeout(r, 50));
    try { if (w.location.pathname === '/healthz' && w.document.readyState === 'complete') break; }
    catch (e) { /* still about:blank */ }
  }
  out.popup = w.document.body.innerText;
  const call = async (path, body, token) => {
    const headers = {'Content-Type': 'application/json'};
    if (token) headers.Authorization = 'Bearer ' + token;
    const r = await w.fetch(path, {method: body ? 'POST' : 'GET', headers,
                                   body: body ? JSON.stringify(body) : undefined});
    return [r.status, await r.json().catch(() => null)];
  };
  try {
    const demo = {email: 'demo@example.com', password: 'demo'};
    const [login, doc] = await call('/v1/auth/login', demo);
    out.login = login;
    if (login === 200) {
      const token = doc.data.access_token;
      const [, me] = await call('/v1/me', null, token);
      out.init = (await call('/v1/chat/init', {query: 'on the platform key'}, token))[0];
      out.key = (await call('/v1/admin/api-keys', {user_id: me.data.user.id}, token))[0];
    }
  } catch (e) { out.error = String(e); }
  window.result = out;
})();
</script>"""


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`dev`'s three apps on sockets; yields the control plane's URL and the demo key."""
    mock_sock, cp_sock, edge_sock = (bind_free_socket() for _ in range(3))
    database = f"sqlite:///{tmp_path_factory.mktemp('dev-rebinding') / 'dev.db'}"
    env = {
        **base_env(database),
        "LLMGW_CONTROL_PLANE_URL": url_of(cp_sock),
        "LLMGW_EDGE_PUBLIC_URL": url_of(edge_sock),
        "LLMGW_CORS_ORIGINS": f"{url_of(cp_sock)},http://localhost:{cp_sock.getsockname()[1]}",
        "LLMGW_SERVE_DEMO": "1",
    }
    settings, edge_settings = settings_from_env(env, dev=True, mock_url=f"{url_of(mock_sock)}/v1")
    control_plane, edge, mock = dev_apps(settings, edge_settings, MemoryStore())
    with ServerGroup([(mock, mock_sock), (control_plane, cp_sock), (edge, edge_sock)]):
        key = asyncio.run(seed_demo(database, own_database_only=True))
        yield url_of(cp_sock), key


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    # The rebinding, done: the attacker's name now resolves to this machine.
    with launched(f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1") as browser:
        yield browser


@pytest.mark.parametrize(
    ("header", "name", "allowed"),
    [
        ("127.0.0.1:8000", "127.0.0.1", True),
        ("[::1]:8000", "::1", True),
        ("LOCALHOST:8000", "localhost", True),
        ("app.localhost", "app.localhost", True),
        (f"{REBOUND}:8000", REBOUND, False),
        ("localhost.attacker.test", "localhost.attacker.test", False),
        ("localhost:8000, attacker.test", "localhost:8000, attacker.test", False),
        ("0.0.0.0:8000", "0.0.0.0", False),
        ("10.0.0.8", "10.0.0.8", False),
    ],
)
def test_host_names_of_this_machine(header: str, name: str, allowed: bool) -> None:
    assert host_name(header) == name
    assert host_allowed(header, frozenset()) is allowed
    assert host_allowed(header, frozenset({name})) is True  # a configured public URL's host


def test_a_website_rebinding_its_name_to_loopback_cannot_use_the_demo_owner(
    dev: tuple[str, str], chromium: Any
) -> None:
    """Before: any page the developer visited while `dev` ran could move its name to
    127.0.0.1 and, through a popup on `/healthz`, sign in as demo@example.com / demo
    (200), hold credits for a chat on the platform's keys (201) and mint an owner API
    key (201). Measured in this chromium against `dev`'s apps."""
    cp_url, demo_key = dev
    port = cp_url.rsplit(":", 1)[1]
    context = chromium.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(15_000)
        attacker = f"http://{REBOUND}:{port}/"
        page.route(attacker, lambda route: route.fulfill(content_type="text/html", body=ATTACK))
        page.goto(attacker)
        page.wait_for_function("window.result !== undefined")
        result = page.evaluate("window.result")
    finally:
        context.close()
    assert result["login"] == 400, result
    assert "untrusted_host" in result["popup"]
    assert set(result) == {"popup", "login"}  # nothing further was reachable
    # Nothing changed: no hold, no key beyond the one `dev` printed.
    api = httpx.Client(base_url=cp_url, headers={"Authorization": f"Bearer {demo_key}"})
    with api:
        me = api.get("/v1/me").json()["data"]
        assert me["user"]["email"] == DEMO_EMAIL and me["credits"]["held"] == "0.000000"
        keys = api.get("/v1/admin/api-keys", params={"company_id": me["company"]["id"]})
        assert len(keys.json()["data"]["items"]) == 1


def test_dev_still_serves_the_demo_page_at_localhost(
    dev: tuple[str, str], chromium: Any, tmp_path: Path
) -> None:
    """The names a developer types still work: the page at localhost signs in as the
    demo owner and streams from the edge at 127.0.0.1."""
    cp_url, _ = dev
    context = chromium.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.goto(cp_url.replace("127.0.0.1", "localhost") + "/")
        page.click("#sign-in")  # the demo account is prefilled
        page.wait_for_selector("#model option", state="attached")
        send(page, "Hello from localhost")
        assert finished_answer(page).inner_text()
    finally:
        context.close()
