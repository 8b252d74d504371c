"""The mock's state and the steps every wire format's handler shares.

All mutable state (counters, the log of received requests) lives on one `MockServer`
per app, never in module globals, so tests and the embedded ``dev`` runner can hold
several independent mocks in one process.
"""

from __future__ import annotations

import hmac
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from mock_llm.errors import MockAPIError
from mock_llm.rate_limits import RequestTooLarge
from mock_llm.script import (
    Completion,
    Message,
    MockBehaviour,
    count_prompt_tokens,
    plan_completion,
    resolve_behaviour,
)
from mock_llm.streaming import Frames, MockStats, TrackedStream, take_as_long_as_a_stream
from mock_llm.tools import ToolSpec

REQUEST_LOG_SIZE = 100


def json_response(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


class _NotJSON:
    """What `MockServer.accept` returns for a body that is not JSON."""


NOT_JSON = _NotJSON()


def require_json(body: Any) -> Any:
    if body is NOT_JSON:
        raise MockAPIError(400, "the request body is not valid JSON", code="invalid_json")
    return body


def secret_matches(given: str | None, expected: str) -> bool:
    # Constant time: no key probing.
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class MockServer:
    """One mock backend: its models, credentials, counters and request log.

    ``requests`` keeps what the last requests carried (path, query, headers, body) so
    gateway tests can assert what an upstream actually received, e.g. that the
    in-house backend got the caller's context and never the client's stream token.
    It is a test tool: a real backend would never echo credentials back.
    """

    def __init__(
        self,
        models: Mapping[str, MockBehaviour],
        api_key: str | None,
        service_token: str | None = None,
    ) -> None:
        self.models = dict(models)
        self.api_key = api_key
        self.service_token = service_token
        self.failures_by_prompt: dict[str, int] = {}
        self.stats = MockStats()
        self.requests: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_SIZE)

    async def accept(self, request: Request) -> Any:
        """Count and log the request; return its decoded body, or `NOT_JSON` (the
        handler calls `require_json` after its auth check, as the vendors order them)."""
        # Counted before any check: gateway tests assert the backend saw nothing at all.
        self.stats.requests += 1
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            body = NOT_JSON
        self.requests.append(
            {
                "method": request.method,
                "path": request.url.path,
                "query": dict(request.query_params),
                "headers": {name.lower(): value for name, value in request.headers.items()},
                "body": None if body is NOT_JSON else body,
            }
        )
        return body

    def _should_fail(self, messages: list[Message], behaviour: MockBehaviour) -> bool:
        """`fail_times=N`: the first N requests with this prompt fail, later ones succeed
        (a backend that answers 429 and then recovers)."""
        if behaviour.fail_times is None:
            return True
        key = "\x00".join(f"{m.role}:{m.text}" for m in messages)
        seen = self.failures_by_prompt.get(key, 0)
        self.failures_by_prompt[key] = seen + 1
        return seen < behaviour.fail_times

    def plan(
        self,
        model: str,
        messages: Iterable[Message],
        headers: Mapping[str, str],
        max_tokens: int | None,
        tools: tuple[ToolSpec, ...] = (),
    ) -> tuple[Completion, MockBehaviour]:
        """The answer and its behaviour, or the error the directives or model ask for."""
        default = self.models.get(model)
        if default is None:
            raise MockAPIError(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        messages = list(messages)
        behaviour = resolve_behaviour(default, messages, headers)
        if behaviour.fail_status is not None and self._should_fail(messages, behaviour):
            self.stats.failed += 1
            status = behaviour.fail_status
            raise MockAPIError(
                status,
                f"mock: failing with {status} as asked",
                code="mock_failure",
                retry_after_s=behaviour.retry_after_s,
            )
        if behaviour.tpm_limit is not None:
            requested = count_prompt_tokens(messages) + (max_tokens or 0)
            if requested > behaviour.tpm_limit:
                self.stats.failed += 1
                raise RequestTooLarge(model, behaviour.tpm_limit, requested)
        return plan_completion(messages, behaviour, max_tokens, tools), behaviour

    def stream(
        self,
        frames: Frames,
        completion: Completion,
        behaviour: MockBehaviour,
    ) -> Response:
        return TrackedStream(frames, completion, behaviour, self.stats)

    async def whole(
        self, request: Request, completion: Completion, behaviour: MockBehaviour
    ) -> None:
        await take_as_long_as_a_stream(self.stats, completion, behaviour, request.receive)
