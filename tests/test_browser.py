"""The demo page in a real browser: Debian's `chromium` driven by Python `playwright`.

This is how our users' frontends consume the gateway: the page is served by the
control plane and opens an `EventSource` straight on the edge, another origin, so
the edge's CORS and the resume protocol are exercised exactly as in production.

The edge sits behind a small TCP proxy (its public URL points there), so a test can
cut the browser's connection mid-stream the way a flaky network would. Never
downloads a browser: it uses `/usr/bin/chromium` (`make install-system` installs it)
and skips when it is absent, except under CI, where that is a broken machine.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from control_plane.app import create_app as control_plane_app
from llm_gateway.dev import settings_from_env
from mock_llm.app import create_app as mock_app
from shared.store_memory import MemoryStore
from stream_edge.app import create_app as edge_app
from tests.chromium import assert_not_blank, browser, persistent, watched_page
from tests.harness import ServerGroup, bind_free_socket, url_of
from tests.stack import Client, base_env

__all__ = ["browser"]  # the fixture, used by name

PASSWORD = "browser-pw-123"


class CuttableProxy:
    """A TCP proxy to `target` whose live connections a test can cut at once (`cut`),
    as a dropped network would; new connections keep being accepted afterwards."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = bind_free_socket()
        self.listener.listen(64)
        self.url = url_of(self.listener)
        self.connections = 0
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="cuttable-proxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._live |= {client, upstream}
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with self._lock:
                    self._live.discard(sock)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def cut(self) -> int:
        """Drop every open connection (both sides see it end); returns how many."""
        with self._lock:
            live = list(self._live)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(live) // 2

    def close(self) -> None:
        self.listener.close()
        self.cut()


@dataclasses.dataclass
class BrowserStack:
    page_url: str  # the control plane, which serves the demo page
    stream_origin: str  # what the browser's EventSource connects to (the proxied edge)
    client: Client
    proxy: CuttableProxy

    def new_user(self, credits: str) -> str:
        """A company with `credits` and a member of it; returns the member's email."""
        company_id = self.client.new_company(credits)
        email = f"b-{uuid.uuid4().hex[:10]}@example.com"
        response = self.client.admin(
            "POST",
            "/v1/admin/users",
            json={"company_id": company_id, "email": email, "password": PASSWORD},
        )
        assert response.status_code == 201, response.text
        return email

    def expected_answer(self, query: str, model: str = "mock-fast") -> str:
        """What the deterministic mock answers to `query` (asked directly, not streamed)."""
        response = self.client.http.post(
            f"{self.client.mock_url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": query}]},
        )
        assert response.status_code == 200, response.text
        text: str = response.json()["choices"][0]["message"]["content"]
        return text


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserStack]:
    mock_sock, cp_sock, edge_sock = (bind_free_socket() for _ in range(3))
    proxy = CuttableProxy(edge_sock.getsockname()[:2])
    database = tmp_path_factory.mktemp("browser") / "gateway.db"
    env = {
        **base_env(f"sqlite:///{database}"),
        "LLMGW_CONTROL_PLANE_URL": url_of(cp_sock),
        "LLMGW_EDGE_PUBLIC_URL": proxy.url,
        # Exactly the page's origin, as `llm-gateway dev` configures it: no wildcard.
        "LLMGW_CORS_ORIGINS": url_of(cp_sock),
        "LLMGW_SERVE_DEMO": "1",
    }
    settings, edge_settings = settings_from_env(env, mock_url=f"{url_of(mock_sock)}/v1")
    store = MemoryStore()
    group = ServerGroup(
        [
            (mock_app(), mock_sock),
            (control_plane_app(settings, store), cp_sock),
            (edge_app(edge_settings, store), edge_sock),
        ]
    ).start()
    client = Client(url_of(cp_sock), proxy.url, url_of(mock_sock), env["LLMGW_WEBHOOK_SECRET"])
    try:
        yield BrowserStack(url_of(cp_sock), proxy.url, client, proxy)
    finally:
        client.close()
        proxy.close()
        group.stop()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    # Playwright's `wait_for_function` evaluates its string in the page, which the
    # page's Content-Security-Policy forbids: these tests set the policy aside, and
    # `test_the_page_runs_only_its_own_script` signs in and streams under it.
    with watched_page(browser, 1100, 760) as page:
        yield page


def sign_in(page: Any, stack: BrowserStack, email: str) -> None:
    page.goto(stack.page_url + "/")
    assert page.is_visible("#signin") and not page.is_visible("#app")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("#sign-in")
    page.wait_for_selector("#app", state="visible")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert not page.is_visible("#signin")


def page_token(page: Any) -> str:
    """The page's access token (to check its numbers against the API)."""
    token: str = page.evaluate("sessionStorage.getItem('llmgw.demo.access_token')")
    assert token
    return token


def send(page: Any, query: str) -> None:
    page.fill("#query", query)
    page.click("#send")


def balance(page: Any) -> str:
    text: str = page.inner_text("#balance")
    return text


def finished_answer(page: Any) -> Any:
    """The last assistant message once its stream has ended and its cost is known."""
    page.wait_for_selector(".msg.assistant[data-state=done]")
    page.wait_for_selector(".meta[data-settled=true]")
    return page.locator(".msg.assistant").last


def test_sign_in_stream_an_answer_and_see_the_balance_change(
    stack: BrowserStack, page: Any, browser: Any, tmp_path: Path
) -> None:
    email = stack.new_user(credits="5")
    streams: list[str] = []
    page.on("request", lambda r: streams.append(r.url) if "/v1/stream" in r.url else None)
    sign_in(page, stack, email)
    assert balance(page) == "5.000000"
    assert "mock-fast" in page.locator("#model option").all_inner_texts()
    page.select_option("#model", "mock-fast")

    query = "Tell me about streaming. [[mock tokens=30 delay_ms=15]]"
    send(page, query)
    # Tokens show up while the answer is still streaming.
    page.wait_for_selector(".msg.assistant[data-state=streaming]")
    page.wait_for_function(
        "document.querySelector('.msg.assistant').textContent.length > 0"
        " && document.querySelector('.msg.assistant').dataset.state === 'streaming'"
    )
    answer = finished_answer(page)
    assert answer.inner_text() == stack.expected_answer(query)

    # The EventSource went straight to the edge: a different origin from the page.
    assert streams and all(
        url.startswith(stack.stream_origin + "/v1/stream?token=") for url in streams
    )
    assert not stack.stream_origin.startswith(stack.page_url)

    # Time to first token, tokens and the settled cost are shown.
    meta = page.locator(".meta").last.inner_text()
    assert "first token" in meta and "30 tokens" in meta and "cost 0.0" in meta, meta

    # The balance shown is the settled one: what the API says, below the starting 5.
    token = page_token(page)
    usage = stack.client.as_user(token, "GET", "/v1/usage").json()["data"]["items"]
    assert len(usage) == 1 and usage[0]["status"] == "completed"
    assert f"cost {usage[0]['cost']} credits" in meta
    page.wait_for_function(
        "(expected) => document.querySelector('#balance').textContent === expected",
        arg=stack.client.credits(token)["available"],
    )
    assert float(balance(page)) < 5

    # A second turn in the same session, then the session's history from the server.
    second = "And briefly? [[mock tokens=5]]"
    send(page, second)
    page.wait_for_function("document.querySelectorAll('.meta[data-settled=true]').length === 2")
    # A finished chat, with each answer's stats: saved with the test and checked not blank.
    shot = page.screenshot(path=str(tmp_path / "finished-chat.png"), full_page=True)
    assert (tmp_path / "finished-chat.png").stat().st_size == len(shot)
    assert_not_blank(browser, shot)

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.locator("#sessions button").first.click()
    page.wait_for_function("document.querySelectorAll('#history .msg').length === 4")
    texts = page.locator("#history .msg").all_inner_texts()
    assert texts == [query, stack.expected_answer(query), second, stack.expected_answer(second)]


def test_signing_out_of_the_demo_page_ends_the_token_on_the_server(
    stack: BrowserStack, page: Any
) -> None:
    """Attack: a member signs out of the demo page on a shared machine (the page
    members use: the console is for owners); a copy of its access token taken before
    (a lost laptop's, a shared screen's) stayed valid for its whole hour, as did the
    stream tokens it minted. *Sign out* ends it on the server (`POST
    /v1/auth/logout`), as the console's does, before forgetting it."""
    sign_in(page, stack, stack.new_user(credits="5"))
    token = page_token(page)
    assert stack.client.as_user(token, "GET", "/v1/me").status_code == 200
    page.click("#sign-out")
    page.wait_for_selector("#signin", state="visible")
    assert page.evaluate("() => sessionStorage.length") == 0
    after = stack.client.as_user(token, "GET", "/v1/me")
    assert after.status_code == 401, after.text
    assert after.json()["error"]["code"] == "signed_out"


def test_a_chat_and_its_tokens_are_not_left_in_the_browsers_disk_cache(
    stack: BrowserStack, browser: Any, tmp_path: Path
) -> None:
    """Attack: a member chats on the demo page on a shared machine and signs out; the
    next user of the machine reads the browser's disk cache, where every API answer
    stayed (no `Cache-Control`): the transcript (`GET /v1/sessions/{id}`), and the
    answers carrying credentials. Every control plane JSON answer is `no-store`."""
    marker = f"secret-{uuid.uuid4().hex}"
    profile = tmp_path / "profile"
    with persistent(browser, str(profile)) as context:
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.goto(stack.page_url + "/")
        page.fill("#email", stack.new_user(credits="5"))
        page.fill("#password", PASSWORD)
        page.click("#sign-in")
        page.wait_for_selector("#model option", state="attached")
        send(page, f"Remember {marker}")
        assert finished_answer(page).inner_text()
        page.click("#sessions button")  # reads the transcript back: GET /v1/sessions/{id}
        page.wait_for_selector(".msg.user")
        token = page.evaluate("sessionStorage.getItem('llmgw.demo.access_token')")
        page.click("#sign-out")
        page.wait_for_selector("#signin", state="visible")
    cached = [path for path in profile.rglob("*") if path.is_file() and "Cache" in str(path)]
    assert cached  # the profile has its cache (the page and its script are in it)
    for path in cached:
        body = path.read_bytes()
        assert marker.encode() not in body, path
        assert token.encode() not in body, path


def test_out_of_credits_shows_a_readable_message(stack: BrowserStack, page: Any) -> None:
    # Less than one request's hold (input estimate + 1,024 output tokens at 2/Mtok).
    email = stack.new_user(credits="0.001")
    sign_in(page, stack, email)
    send(page, "Hello?")
    page.wait_for_selector("#error:has-text('out of credits')")
    assert "Ask an admin to add credits" in page.inner_text("#error")
    assert page.locator(".msg").count() == 0  # nothing was sent
    assert page.input_value("#query") == "Hello?"  # the message is kept to retry
    assert balance(page) == "0.001000"
    assert not page.is_disabled("#send")


def test_a_dropped_connection_resumes_without_losing_tokens(stack: BrowserStack, page: Any) -> None:
    email = stack.new_user(credits="5")
    stream_requests: list[Any] = []
    page.on("request", lambda r: stream_requests.append(r) if "/v1/stream" in r.url else None)
    sign_in(page, stack, email)
    query = "Count slowly. [[mock tokens=40 delay_ms=50]]"
    expected = stack.expected_answer(query)
    send(page, query)
    page.wait_for_function("document.querySelector('.msg.assistant')?.textContent.length > 0")
    shown_before = len(page.locator(".msg.assistant").inner_text())
    assert stack.proxy.cut() >= 1  # the browser's stream is gone mid-answer
    page.wait_for_selector(".msg.assistant[data-state=reconnecting]", timeout=5_000)
    assert "reconnecting" in page.inner_text("#status")

    answer = finished_answer(page)
    assert 0 < shown_before < len(expected)
    assert answer.inner_text() == expected  # nothing lost, nothing twice
    assert "resumed after 1 dropped connection" in page.locator(".meta").last.inner_text()
    assert page.inner_text("#error") == ""

    # The browser reconnected by itself with Last-Event-ID, and the edge resumed.
    assert len(stream_requests) >= 2
    resumed = stream_requests[-1].all_headers()
    assert int(resumed["last-event-id"]) >= 1
    # Billing saw one whole answer: the producer kept running while the client was away.
    usage = stack.client.as_user(page_token(page), "GET", "/v1/usage").json()
    [record] = usage["data"]["items"]
    assert record["status"] == "completed" and record["output_tokens"] == 40


def test_an_upstream_failure_is_explained(stack: BrowserStack, page: Any) -> None:
    email = stack.new_user(credits="5")
    sign_in(page, stack, email)
    send(page, "Break, please. [[mock tokens=20 error_after=3]]")
    page.wait_for_selector(".msg.assistant[data-state=failed]")
    page.wait_for_selector('#error:has-text("backend failed while answering")')
    assert page.locator(".msg.assistant").inner_text() != ""  # the part that arrived stays
    # The hold is settled for what was relayed; the page shows the new balance.
    page.wait_for_selector(".meta[data-settled=true]")
    assert float(balance(page)) < 5


def test_the_page_runs_only_its_own_script(stack: BrowserStack, browser: Any) -> None:
    """Attack: markup slipped into the page (an answer rendered as HTML by a future
    edit, a proxy's injection) runs no script and sends nothing elsewhere: the policy
    allows only the page's own inline script, by its hash, and connections only to
    this origin and the edge's."""
    page_bytes = (Path(__file__).resolve().parents[1] / "web" / "index.html").read_bytes()
    script = page_bytes.split(b"<script>", 1)[1].split(b"</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(15_000)
        console: list[str] = []
        page.on("console", lambda msg: console.append(msg.text))
        page.on("pageerror", lambda exc: console.append(str(exc)))
        response = page.goto(stack.page_url + "/")
        policy = response.headers["content-security-policy"]
        assert f"script-src 'sha256-{digest}';" in policy
        assert f"connect-src 'self' {stack.stream_origin};" in policy
        assert "frame-ancestors 'none'" in policy
        # The page itself works under the policy: sign in, stream, settle.
        page.fill("#email", stack.new_user(credits="5"))
        page.fill("#password", PASSWORD)
        page.click("#sign-in")
        page.wait_for_selector("#model option", state="attached")
        send(page, "Hello under a policy")
        assert finished_answer(page).inner_text()
        assert not [text for text in console if "Content Security Policy" in text], console

        def refusal(msg: Any) -> bool:
            return "Content Security Policy" in msg.text

        with page.expect_console_message(refusal):
            page.evaluate(
                """() => {
                    const s = document.createElement('script');
                    s.textContent = 'window.injected = true';
                    document.body.appendChild(s);
                }"""
            )
        with page.expect_console_message(refusal):
            page.evaluate(
                """() => {
                    const img = document.createElement('img');
                    img.src = 'http://127.0.0.1:9/leak.png';
                    document.body.appendChild(img);
                }"""
            )
        assert page.evaluate("window.injected === undefined")
    finally:
        context.close()


def test_the_demo_tool_runs_in_the_page(stack: BrowserStack, page: Any) -> None:
    """The model calls `add`; the page runs it, sends the result with `tool_results`
    and streams the model's final answer on the same session."""
    email = stack.new_user(credits="5")
    sign_in(page, stack, email)
    page.select_option("#model", "mock-fast")
    page.check("#demo-tool")
    send(page, "Add two numbers [[mock tool_calls=1]]")
    page.wait_for_function("document.querySelectorAll('.meta[data-settled=true]').length === 2")
    answer = finished_answer(page)
    assert answer.inner_text()
    call = page.locator(".meta", has_text="→ add(").inner_text()
    args = json.loads(call[len("→ add(") : call.index(") = ")])
    assert json.loads(call.split(") = ", 1)[1]) == {"sum": args["a"] + args["b"]}
    token = page_token(page)
    sessions = stack.client.as_user(token, "GET", "/v1/sessions").json()["data"]["items"]
    chat = stack.client.as_user(token, "GET", f"/v1/sessions/{sessions[0]['id']}").json()
    roles = [m["role"] for m in chat["data"]["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]


PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def test_an_attached_image_goes_upstream_as_a_content_part(stack: BrowserStack, page: Any) -> None:
    """15.2: the attach button sends the image as an `image_url` data: URL part, only
    for a model that lists `vision`; the session keeps an [image] placeholder."""
    email = stack.new_user(credits="5")
    sign_in(page, stack, email)
    page.select_option("#model", "mock-fast")
    assert not page.is_visible("#attach-label")  # a text-only model
    page.select_option("#model", "mock-vision")
    page.set_input_files("#attach", files=[
        {"name": "dot.png", "mimeType": "image/png", "buffer": PNG_1PX}])  # fmt: skip
    page.wait_for_selector("#attachment:not([hidden])")
    send(page, "What is in this picture?")
    assert finished_answer(page).inner_text()
    assert page.is_hidden("#attachment")
    requests = stack.client.http.get(f"{stack.client.mock_url}/_mock/requests").json()["requests"]
    content = requests[-1]["body"]["messages"][-1]["content"]
    url = "data:image/png;base64," + base64.b64encode(PNG_1PX).decode()
    assert content == [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    token = page_token(page)
    sessions = stack.client.as_user(token, "GET", "/v1/sessions").json()["data"]["items"]
    chat = stack.client.as_user(token, "GET", f"/v1/sessions/{sessions[0]['id']}").json()
    assert "[image]" in chat["data"]["messages"][0]["content"]


def test_a_members_markup_renders_as_text_on_the_owners_page(
    stack: BrowserStack, page: Any
) -> None:
    """Attack: a member writes markup into a chat (its session's title and history)
    and the company a model id; the owner's page lists the company's sessions and
    models. The `page` fixture sets the CSP aside: only the rendering stands between
    the markup and the owner's token."""
    hostile = "<img/src/onerror=window.pwned=1>"
    company_id = stack.client.new_company("5")
    owner = f"o-{uuid.uuid4().hex[:10]}@example.com"
    created = stack.client.admin(
        "POST",
        "/v1/admin/users",
        json={"company_id": company_id, "email": owner, "password": PASSWORD, "role": "owner"},
    )
    assert created.status_code == 201, created.text
    member = stack.client.new_user(company_id)
    grant = stack.client.init_ok(member, {"query": f"hi {hostile}", "max_tokens": 20})
    with stack.client.http.stream("GET", grant["stream_url"]) as stream:
        assert b"event: complete" in b"".join(stream.iter_bytes())
    sign_in(page, stack, owner)
    title = page.locator("#sessions button", has_text=hostile)
    title.click()
    page.wait_for_selector(f".msg.user:has-text('{hostile}')")
    assert page.evaluate("window.pwned") is None
    assert page.locator("#app img:not(#attachment-preview), #app svg, #app iframe").count() == 0
