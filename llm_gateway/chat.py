"""`llm-gateway chat "question"`: the terminal client.

Signs in with `LLMGW_API_KEY` against `LLMGW_CONTROL_PLANE_URL`, asks for a stream
(`POST /v1/chat/init`), follows the EventSource on the edge printing tokens as they
arrive, and ends with one summary line on stderr (so stdout holds only the answer):
tokens, cost once settled (else the amount reserved), time to first token and the
session id to continue with `--session`.

A dropped connection is resumed like a browser's EventSource would: reconnect with the
same stream URL and `Last-Event-ID` (DESIGN §6); event ids guard against printing a
token twice.

`--demo-tool` offers the model a built-in tool, `add` (docs/tool-calls.md): when the
answer ends in `tool_call` events, the calls run here, a line per call goes to stderr,
and their results go back with `tool_results` on the same session until the model
answers in text.

Whatever the model (or a backend) wrote is printed as text, never as terminal
commands: control characters are shown as U+FFFD (`printable`), so an answer cannot
set the clipboard (OSC 52), retitle the window, or hide and overwrite what is shown.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx
import orjson

from shared.sse import SSEDecoder

DEFAULT_CONTROL_PLANE_URL = "http://127.0.0.1:8000"
# Short connect, long read: the edge pings idle streams every 15 s.
TIMEOUT = httpx.Timeout(connect=5.0, read=60.0, write=10.0, pool=5.0)
RECONNECTS = 5
RECONNECT_DELAY_S = 0.5
SETTLE_WAIT_S = 3.0
MAX_TOOL_ROUNDS = 4
# The built-in tool of `--demo-tool` (the demo page offers the same one).
DEMO_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
}

STREAM_ERRORS = {
    "upstream_error": "the model's backend failed while answering",
    "upstream_timeout": "the model took too long to respond",
    "upstream_rate_limited": "the model's provider is rate limiting; try again shortly",
    "upstream_auth": "the gateway could not authenticate with the model's provider",
    "revoked": "access was revoked by an administrator",
    "shutting_down": "the server restarted while answering; ask again",
}


# C0 and C1 controls and DEL: ESC opens the sequences a terminal obeys (OSC 52 writes
# the clipboard, others rewrite the title or hide text), 0x9B is an 8-bit CSI, and a
# carriage return overwrites the line shown. Newlines and tabs are text.
_CONTROLS: dict[int, str | None] = {
    code: "\ufffd" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if code not in (0x09, 0x0A)
}
_CONTROLS[0x0D] = None  # "\r\n" (and a chunk ending in "\r") is a plain newline


def printable(text: str) -> str:
    """`text` safe to write to a terminal: its control characters made harmless."""
    return text.translate(_CONTROLS)


class ChatError(Exception):
    """Ends the command with a message on stderr and a non-zero exit status."""


def add_chat_parser(sub: Any) -> None:
    cmd = sub.add_parser(
        "chat",
        help="ask a question and stream the answer (needs LLMGW_API_KEY)",
        description="Ask a question through the gateway and print the answer as it streams. "
        "Reads LLMGW_API_KEY and LLMGW_CONTROL_PLANE_URL "
        f"(default {DEFAULT_CONTROL_PLANE_URL}).",
    )
    cmd.add_argument("question")
    cmd.add_argument("--model", help="a model id from /v1/models (default: the company's)")
    cmd.add_argument("--session", help="continue this chat session (its id)")
    cmd.add_argument(
        "--demo-tool",
        action="store_true",
        help="offer the model a built-in tool, add(a, b), and run the calls it makes",
    )


def run_chat(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    api_key = env.get("LLMGW_API_KEY", "").strip()
    if not api_key:
        print(
            "llm-gateway chat: set LLMGW_API_KEY to an API key "
            "(`make run` prints a demo key: export LLMGW_API_KEY=sk_…)",
            file=sys.stderr,
        )
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no per-request lines here
    base = (env.get("LLMGW_CONTROL_PLANE_URL") or DEFAULT_CONTROL_PLANE_URL).rstrip("/")
    try:
        with httpx.Client(
            base_url=base, timeout=TIMEOUT, headers={"Authorization": f"Bearer {api_key}"}
        ) as http:
            summary = chat(
                http, args.question, args.model, args.session, sys.stdout, tools=args.demo_tool
            )
    except ChatError as exc:
        print(f"llm-gateway chat: {printable(str(exc))}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"llm-gateway chat: cannot reach the gateway ({exc})", file=sys.stderr)
        return 1
    print(summary, file=sys.stderr)
    return 0


@dataclass
class Answer:
    text: list[str] = field(default_factory=list)
    last_id: int = 0
    first_token_at: float | None = None
    done: dict[str, Any] | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def run_demo_tool(call: Mapping[str, Any]) -> str:
    """The result of one `add` call, as JSON text. Bad arguments are the model's
    mistake: they are answered with an error it can read, never raised."""
    try:
        args = orjson.loads(str(call.get("arguments", "")))
        a, b = args["a"], args["b"]
        if call.get("name") != "add" or not all(
            isinstance(n, int | float) and not isinstance(n, bool) for n in (a, b)
        ):
            raise TypeError
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return orjson.dumps({"error": "add takes two numbers, a and b"}).decode()
    return orjson.dumps({"sum": a + b}).decode()


def chat(
    http: httpx.Client,
    question: str,
    model: str | None,
    session: str | None,
    out: TextIO,
    edge: httpx.Client | None = None,
    *,
    tools: bool = False,
    notes: TextIO | None = None,
) -> str:
    """Run one turn (and, with `tools`, the tool rounds it leads to); print the answer
    to `out` and each tool call to `notes` (stderr); return the summary line. `http`
    talks to the control plane with the API key; `edge` (default: a fresh client) to
    the edge."""
    body: dict[str, Any] = {"query": question}
    if model:
        body["model"] = model
    if session:
        body["session_id"] = session
    if tools:
        body["tools"] = [DEMO_TOOL]
    started = time.perf_counter()
    grant, answer = _turn(http, body, started, out, edge)
    for _ in range(MAX_TOOL_ROUNDS):
        if not tools or not answer.tool_calls:
            break
        results = []
        for call in answer.tool_calls:
            result = run_demo_tool(call)
            print(
                printable(f"→ {call.get('name')}({call.get('arguments')}) = {result}"),
                file=notes or sys.stderr,
            )
            results.append({"tool_call_id": call["id"], "content": result})
        body = {"session_id": grant["session_id"], "tool_results": results, "tools": [DEMO_TOOL]}
        if model:
            body["model"] = model
        grant, answer = _turn(http, body, started, out, edge)
    out.write("\n")
    out.flush()
    return _summary(http, grant, answer, time.perf_counter() - started)


TURN_RETRIES = 20  # 409 turn_in_progress: the previous turn settles within moments


def _init(http: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    """`POST /v1/chat/init`, again while the control plane says the session's previous
    turn is still being recorded (tool results sent right after their calls)."""
    response = http.post("/v1/chat/init", json=body)
    for _ in range(TURN_RETRIES):
        if response.status_code != 409 or _code(response) != "turn_in_progress":
            break
        time.sleep(min(float(response.headers.get("Retry-After", "1")), 1.0) / 4)
        response = http.post("/v1/chat/init", json=body)
    return response


def _code(response: httpx.Response) -> str | None:
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def _turn(
    http: httpx.Client,
    body: dict[str, Any],
    started: float,
    out: TextIO,
    edge: httpx.Client | None,
) -> tuple[dict[str, Any], Answer]:
    """One init and its stream, followed to the end."""
    grant = _data(_init(http, body))
    answer = Answer()
    # A client of its own for the edge: the stream URL carries its token, and the API
    # key must not travel to the edge.
    own = httpx.Client(timeout=TIMEOUT) if edge is None else contextlib.nullcontext(edge)
    with own as client:
        problem: Exception | None = None
        for attempt in range(RECONNECTS + 1):
            if attempt:
                time.sleep(RECONNECT_DELAY_S)
            try:
                if _follow(client, grant["stream_url"], answer, started, out):
                    break
                problem = None
            except httpx.TransportError as exc:  # dropped: reconnect with Last-Event-ID
                problem = exc
        else:
            reason = f" ({problem})" if problem else ""
            where = grant["stream_url"].split("?")[0]
            raise ChatError(f"could not stream the answer from {where}{reason}")
    return grant, answer


def _follow(edge: httpx.Client, url: str, answer: Answer, started: float, out: TextIO) -> bool:
    """Read the event stream until `complete` (True) or the connection ends (False)."""
    headers = {"Accept": "text/event-stream"}
    if answer.last_id:
        headers["Last-Event-ID"] = str(answer.last_id)
    with edge.stream("GET", url, headers=headers) as response:
        if response.status_code == 204:  # ended while we were away, nothing left
            return True
        if response.status_code != 200:
            response.read()
            raise ChatError(_explain(response, edge=True))
        decoder = SSEDecoder()
        for raw in response.iter_bytes():
            for event in decoder.feed(raw):
                if event.id is not None and event.id.isdigit():
                    if int(event.id) <= answer.last_id:
                        continue  # already printed before a reconnect
                    answer.last_id = int(event.id)
                payload = orjson.loads(event.data)
                if event.event == "chunk":
                    if answer.first_token_at is None:
                        answer.first_token_at = time.perf_counter() - started
                    answer.text.append(payload["content"])
                    out.write(printable(payload["content"]))
                    out.flush()
                elif event.event == "tool_call":
                    answer.tool_calls.append(payload)
                elif event.event == "complete":
                    answer.done = payload
                    return True
                elif event.event == "error":
                    out.write("\n")
                    code = str(payload.get("code", ""))
                    reason = STREAM_ERRORS.get(code) or payload.get("message") or code
                    raise ChatError(f"the answer stopped: {reason}")
    return False


def _summary(http: httpx.Client, grant: dict[str, Any], answer: Answer, total_s: float) -> str:
    usage = (answer.done or {}).get("usage") or {}
    tokens = int(usage.get("output_tokens", len(answer.text)))
    record = _settled(http, str(grant["reservation_id"]))
    cost = (
        f"cost {record['cost']} credits"
        if record is not None
        else f"{grant['reserved_credits']} credits reserved (not settled yet)"
    )
    first = (
        f"first token {answer.first_token_at * 1000:.0f} ms"
        if answer.first_token_at is not None
        else "no tokens"
    )
    return (
        f"— {tokens} tokens · {cost} · {first} · {total_s:.1f} s · "
        f"{grant['model']} · session {grant['session_id']}"
    )


def _settled(http: httpx.Client, reservation_id: str) -> dict[str, Any] | None:
    """The usage record once the edge's webhook has settled the hold, polled briefly."""
    deadline = time.monotonic() + SETTLE_WAIT_S
    while True:
        response = http.get("/v1/usage", params={"limit": 50})
        if response.status_code != 200:
            return None  # e.g. a key without llm:chat:read: fall back to the hold
        for item in response.json()["data"]["items"]:
            if item.get("reservation_id") == reservation_id:
                found: dict[str, Any] = item
                return found
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def _data(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise ChatError(_explain(response))
    data: dict[str, Any] = response.json()["data"]
    return data


def _explain(response: httpx.Response, edge: bool = False) -> str:
    """One readable sentence for a failed call to the control plane or the edge."""
    try:
        doc = response.json()
    except ValueError:
        doc = {}
    # The control plane's envelope has `message`; the edge's OpenAI shape `error.message`.
    error = doc.get("error") if isinstance(doc, dict) else None
    message = (doc.get("message") if isinstance(doc, dict) else None) or (
        error.get("message") if isinstance(error, dict) else None
    )
    detail = f" ({message})" if message else ""
    status = response.status_code
    if edge and status in (401, 403):
        return f"the edge refused the stream token{detail}"
    if edge and status == 429:
        return f"too many streams at once{detail}; wait for one to finish"
    if status == 401:
        return f"the API key was not accepted{detail}; check LLMGW_API_KEY"
    if status == 402:
        return f"out of credits{detail}; ask an admin to add credits"
    if status == 429:
        wait = response.headers.get("Retry-After")
        return f"slow down, too many requests{detail}" + (f"; retry in {wait} s" if wait else "")
    return message or f"the gateway answered HTTP {status}"
