"""The clients of a chaos run: each plays chat turns (init, then a stream from the
edge) as a real client would while services die under it, and logs what it saw,
so that the bill can be checked against it afterwards (`tests/chaos_books.py`).

A client retries what a real one retries: an init or a first stream request that
found its service down (connection refused), a stream cut by a dying edge (resumed
with `Last-Event-ID`, a few times). What it cannot know (an init whose answer was
lost with the control plane) the books find as a hold nobody holds the token of."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from shared.sse import SSEDecoder
from shared.webhooks import sign
from tests.chaos_schedule import TurnPlan
from tests.test_control_plane import usage_event
from tests.token_claims import claims_of

TURN_SECONDS = 15.0  # one turn's bound, retries included
RETRY_PAUSE = 0.1  # a service down: how long a client waits before trying again
BREAKS_RESUMED = 1  # a stream cut more often than this is given up
TIMEOUT = httpx.Timeout(6.0, connect=2.0)


@dataclass
class TurnLog:
    worker: int
    plan: TurnPlan
    started: float
    ended: float = 0.0
    reservation_id: str | None = None
    init_status: int | None = None  # the last answer to init (201, or a refusal)
    lost_inits: int = 0  # inits that met a dead or dying control plane
    chunks: set[int] = field(default_factory=set)  # chunk indexes received
    last_id: str | None = None
    output: int | None = None  # output_tokens of `complete` / the final usage chunk
    input: int = 0  # and its input_tokens
    finish_reason: str | None = None
    error_code: str | None = None
    reconnects: int = 0
    breaks: int = 0  # connections cut under the client
    outcome: str = ""
    unexpected: list[str] = field(default_factory=list)  # a 5xx answer, a bad shape


class Player:
    """One client (a user's access token) playing its turns against the stack."""

    def __init__(
        self,
        worker: int,
        cp_url: str,
        token: str,
        webhook_secret: str,
        is_settled: Callable[[str], bool],
    ) -> None:
        self.worker = worker
        self.cp_url = cp_url
        self.token = token
        self.webhook_secret = webhook_secret
        self.is_settled = is_settled
        self.http = httpx.Client(timeout=TIMEOUT)

    def close(self) -> None:
        self.http.close()

    def play(self, plan: TurnPlan, t0: float) -> TurnLog:
        turn = TurnLog(self.worker, plan, started=time.monotonic() - t0)
        deadline = time.monotonic() + TURN_SECONDS
        try:
            grant = self._init(turn, deadline)
            if grant is not None:
                self._stream(turn, grant, deadline)
        finally:
            turn.ended = time.monotonic() - t0
        return turn

    def _messages(self, plan: TurnPlan) -> list[dict[str, str]]:
        directive = f"tokens={plan.tokens} delay_ms={plan.delay_ms}"
        if plan.behaviour == "upstream_error":
            directive += f" error_after={plan.cut_after}"
        if plan.behaviour == "no_usage":
            directive += " usage=0"
        return [{"role": "user", "content": f"turn {uuid.uuid4().hex} [[mock {directive}]]"}]

    def _init(self, turn: TurnLog, deadline: float) -> dict[str, Any] | None:
        body = {"messages": self._messages(turn.plan), "max_tokens": turn.plan.max_tokens}
        headers = {"Authorization": f"Bearer {self.token}"}
        while time.monotonic() < deadline:
            try:
                r = self.http.post(f"{self.cp_url}/v1/chat/init", json=body, headers=headers)
            except httpx.TransportError:
                turn.lost_inits += 1  # its hold may have committed: the books will tell
                time.sleep(RETRY_PAUSE)
                continue
            turn.init_status = r.status_code
            if r.status_code == 201:
                grant: dict[str, Any] = r.json()["data"]
                grant["messages"] = body["messages"]
                turn.reservation_id = grant["reservation_id"]
                return grant
            if r.status_code >= 500 and r.status_code != 503:
                turn.unexpected.append(f"init {r.status_code}: {r.text[:200]}")
            if r.status_code in (503, 429):  # starting up, or a limit: later
                time.sleep(RETRY_PAUSE)
                continue
            turn.outcome = f"init {r.status_code}"
            return None
        turn.outcome = "init gave up"
        return None

    def _stream(self, turn: TurnLog, grant: dict[str, Any], deadline: float) -> None:
        behaviour = turn.plan.behaviour
        if behaviour == "abandon":
            turn.outcome = "abandoned"
        elif behaviour.startswith("completions"):
            turn.outcome = self._completions(turn, grant, deadline)
        else:
            turn.outcome = self._eventsource(turn, grant, deadline)
            if behaviour == "replay" and turn.output is not None:
                self._replay(turn, grant, deadline)

    # --- EventSource ---------------------------------------------------------------

    def _read(self, turn: TurnLog, url: str, resume: bool, stop_after: int | None) -> str:
        """One GET of the stream: `end` (complete or error), `left` (we hung up after
        `stop_after` chunks), `gone` (204), `refused` (the edge is down, or 503: nothing
        started), `broken` (cut mid-way), `status N`."""
        headers = {"Last-Event-ID": turn.last_id or "0"} if resume else {}
        decoder = SSEDecoder()
        try:
            with self.http.stream("GET", url, headers=headers) as r:
                if r.status_code == 204:
                    return "gone"
                if r.status_code != 200:
                    return _refusal(turn, r, "stream")
                for raw in r.iter_raw():
                    for event in decoder.feed(raw):
                        turn.last_id = event.id or turn.last_id
                        data = orjson.loads(event.data) if event.data else {}
                        if event.event == "chunk":
                            turn.chunks.add(int(data["index"]))
                        elif event.event == "complete":
                            turn.output = int(data["usage"]["output_tokens"])
                            turn.input = int(data["usage"]["input_tokens"])
                            turn.finish_reason = data.get("finish_reason")
                            return "end"
                        elif event.event == "error":
                            turn.error_code = str(data.get("code"))
                            return "end"
                    if stop_after is not None and len(turn.chunks) >= stop_after:
                        return "left"
        except httpx.ConnectError:
            return "refused"
        except httpx.TransportError:
            pass
        return "broken"

    def _eventsource(self, turn: TurnLog, grant: dict[str, Any], deadline: float) -> str:
        plan = turn.plan
        hang_up = plan.behaviour in ("leave", "reconnect")
        stop_after: int | None = plan.cut_after if hang_up else None
        resume = False
        while time.monotonic() < deadline:
            result = self._read(turn, grant["stream_url"], resume, stop_after)
            if result == "refused":  # nothing started at the edge: try the same again
                time.sleep(RETRY_PAUSE)
                continue
            if result == "left":
                if plan.behaviour == "leave":
                    return "left"
                time.sleep(plan.pause)
                stop_after, resume = None, True
                turn.reconnects += 1
                continue
            if result == "broken" and turn.breaks < BREAKS_RESUMED:
                turn.breaks += 1
                turn.reconnects += 1
                resume = True
                continue
            return result
        return "gave up"

    # --- /v1/chat/completions ----------------------------------------------------

    def _completions(self, turn: TurnLog, grant: dict[str, Any], deadline: float) -> str:
        body = {
            "messages": grant["messages"],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"Authorization": f"Bearer {grant['stream_token']}"}
        leave = turn.plan.behaviour == "completions_leave"
        url = grant["completions_url"]
        while time.monotonic() < deadline:
            try:
                with self.http.stream("POST", url, json=body, headers=headers) as r:
                    if r.status_code != 200 and _refusal(turn, r, "completions") == "refused":
                        time.sleep(RETRY_PAUSE)
                        continue
                    if r.status_code != 200:
                        return f"status {r.status_code}"
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = orjson.loads(line[6:])
                        if chunk.get("usage"):
                            turn.output = int(chunk["usage"]["completion_tokens"])
                            turn.input = int(chunk["usage"]["prompt_tokens"])
                        for choice in chunk.get("choices", []):
                            if choice["delta"].get("content"):
                                turn.chunks.add(len(turn.chunks))
                            turn.finish_reason = choice.get("finish_reason") or turn.finish_reason
                        if leave and len(turn.chunks) >= turn.plan.cut_after:
                            return "left"
                    return "end"
            except httpx.ConnectError:
                time.sleep(RETRY_PAUSE)
            except httpx.TransportError:
                turn.breaks += 1
                if turn.chunks or turn.breaks > 1:
                    return "broken"
                # Cut before any answer: whether the edge took the token is unknown,
                # so ask again (a second use is refused 401 `token_used`).
        return "gave up"

    # --- a usage webhook posted again ----------------------------------------------

    def _replay(self, turn: TurnLog, grant: dict[str, Any], deadline: float) -> None:
        """The stream's report as its edge sends it, posted by the test too (racing
        the edge's own), then once more with ten times the output once it is settled:
        both are the same webhook id, to be charged once, as the first one that came."""
        output = turn.output or 0
        self._post_usage(turn, grant, output, deadline)
        while time.monotonic() < deadline and not self.is_settled(grant["reservation_id"]):
            time.sleep(0.05)
        self._post_usage(turn, grant, 10 * output + 100, deadline)

    def _post_usage(
        self, turn: TurnLog, grant: dict[str, Any], output: int, deadline: float
    ) -> None:
        event = usage_event(
            grant,
            claims_of(grant["stream_token"])["company_id"],
            finish_reason=turn.finish_reason,
            input_tokens=turn.input,
            output_tokens=output,
            content=None,
        )
        body = event.body()
        while time.monotonic() < deadline:
            try:
                r = self.http.post(
                    f"{self.cp_url}/v1/webhooks/usage",
                    content=body,
                    headers=sign(self.webhook_secret, event.webhook_id, body),
                )
            except httpx.TransportError:
                time.sleep(RETRY_PAUSE)
                continue
            if r.status_code == 503:
                time.sleep(RETRY_PAUSE)
                continue
            if r.status_code != 200:
                turn.unexpected.append(f"replayed webhook {r.status_code}: {r.text[:200]}")
            return


def _refusal(turn: TurnLog, r: httpx.Response, what: str) -> str:
    """A stream request the edge did not start: `refused` for a 503 (e.g. its keys
    unreadable while the control plane is down: try the same again), else `status N`
    (a 5xx noted as unexpected)."""
    r.read()
    if r.status_code == 503:
        return "refused"
    if r.status_code >= 500:
        turn.unexpected.append(f"{what} {r.status_code}: {r.text[:200]}")
    return f"status {r.status_code}"
