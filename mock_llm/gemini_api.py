"""Google Gemini API: ``POST /v1beta/models/{model}:generateContent`` and
``:streamGenerateContent?alt=sse``, the same under ``/v1/``.

Shapes follow https://ai.google.dev/api/generate-content: every stream frame is a
whole ``GenerateContentResponse``, framed ``data: …\\r\\n\\r\\n`` (CRLF, as Google sends);
``usageMetadata`` rides on every frame and grows, and the last frame carries
``finishReason`` and the final counts. There is no ``[DONE]``. Auth is the
``x-goog-api-key`` header or ``?key=``; like Google, a missing key is 403 and a wrong
one is 400 ``API_KEY_INVALID``. Errors use Google's ``{"error": {code, message,
status}}`` shape. Tool calls (``[[mock tool_calls=N]]`` with ``functionDeclarations``)
come as whole ``functionCall`` parts without ids, one frame each, finishing ``STOP``
as Gemini does, the first signed with a ``thoughtSignature`` (as Gemini 3 signs the
first call of a step; ``[[mock signatures=1]]`` refuses a history without it, as
Gemini 3 does); ``functionResponse`` parts answer them. Requests are proto3 JSON:
every field is read in either spelling (``maxOutputTokens`` or ``max_output_tokens``),
as Google reads them, and schema types in either case (``INTEGER``, ``integer``).
Checked with Google's own client, ``google-genai`` (``tests/test_mock_llm_gemini_sdk.py``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mock_llm.errors import MockAPIError
from mock_llm.media import gemini_part_text
from mock_llm.request import invalid, proto_field
from mock_llm.script import Completion, Message
from mock_llm.server import MockServer, json_response, require_json, secret_matches
from mock_llm.tools import ToolSpec, mock_signature

FINISH_REASONS = {"stop": "STOP", "length": "MAX_TOKENS"}
API_VERSIONS = ("v1beta", "v1")


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    messages: tuple[Message, ...]  # the system instruction first, when given
    max_tokens: int | None
    tools: tuple[ToolSpec, ...] = ()


def _part_text(part: object) -> str | None:
    if not isinstance(part, dict):
        return None
    if isinstance(part.get("text"), str):
        return str(part["text"])
    for key, field in (("functionCall", "args"), ("functionResponse", "response")):
        value = proto_field(part, key)
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            return orjson.dumps(value.get(field, {})).decode()
    return None


def _parts_text(value: object, where: str) -> str:
    parts = proto_field(value, "parts")
    if not isinstance(parts, list) or not parts:
        raise invalid(f"* GenerateContentRequest.{where}.parts: must not be empty", where)
    texts = [
        _part_text(p)
        if not isinstance(p, dict) or _part_text(p) is not None
        else gemini_part_text(p, f"{where}.parts[{i}]")
        for i, p in enumerate(parts)
    ]
    if any(t is None for t in texts):
        raise invalid(
            f"* GenerateContentRequest.{where}.parts: only text, inlineData, fileData, "
            "functionCall and functionResponse are supported",
            where,
        )
    return "".join(t for t in texts if t is not None)


def _is_response(content: object) -> bool:
    parts = proto_field(content, "parts")
    return isinstance(parts, list) and all(
        proto_field(p, "functionResponse") is not None for p in parts
    )


def _tools(value: object) -> tuple[ToolSpec, ...]:
    specs: list[ToolSpec] = []
    for tool in value if isinstance(value, list) else []:
        declarations = proto_field(tool, "functionDeclarations")
        for d in declarations if isinstance(declarations, list) else []:
            # An OpenAPI-style `parameters` Schema, or a plain JSON Schema beside it.
            schema = proto_field(d, "parameters") or proto_field(d, "parametersJsonSchema")
            spec = ToolSpec.of(proto_field(d, "name"), schema)
            if spec is not None:
                specs.append(spec)
    return tuple(specs)


def parse_generate_request(body: object) -> GenerateRequest:
    if not isinstance(body, dict):
        raise invalid("Invalid JSON payload received.", None)
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise invalid("* GenerateContentRequest.contents: contents is not specified", "contents")
    messages: list[Message] = []
    system = proto_field(body, "systemInstruction")
    if system is not None:
        messages.append(Message("system", _parts_text(system, "system")))
    for index, content in enumerate(contents):
        role = content.get("role", "user") if isinstance(content, dict) else None
        if role not in ("user", "model"):
            raise invalid(f"* contents[{index}].role: must be 'user' or 'model'", "contents")
        text = _parts_text(content, f"contents[{index}]")
        messages.append(Message("tool" if _is_response(content) else str(role), text))
    limit = proto_field(proto_field(body, "generationConfig"), "maxOutputTokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise invalid("* generationConfig.max_output_tokens: must be positive", "generationConfig")
    return GenerateRequest(tuple(messages), limit, _tools(proto_field(body, "tools")))


MISSING_SIGNATURE = (
    "Function call is missing a thought_signature in functionCall parts. This is required "
    "for tools to work correctly, and missing thought_signature may lead to degraded model "
    "performance. Additional data, function call `default_api:{name}` , position {position}. "
    "Please refer to https://ai.google.dev/gemini-api/docs/thought-signatures for more "
    "details."
)


def check_signatures(body: object) -> None:
    """Gemini 3's rule (with ``[[mock signatures=1]]``): the first ``functionCall`` of
    each ``model`` turn comes back with the signature it was given, or a 400 in
    Google's shape. Only the mock's own signature counts (`mock_signature`)."""
    contents = proto_field(body, "contents")
    for index, content in enumerate(contents if isinstance(contents, list) else []):
        parts = proto_field(content, "parts")
        calls = (
            [p for p in parts if proto_field(p, "functionCall")] if isinstance(parts, list) else []
        )
        if proto_field(content, "role") != "model" or not calls:
            continue
        call = proto_field(calls[0], "functionCall")
        name = str(proto_field(call, "name"))
        expected = mock_signature(name, proto_field(call, "args") or {})
        if proto_field(calls[0], "thoughtSignature") != expected:
            raise MockAPIError(400, MISSING_SIGNATURE.format(name=name, position=index + 1))


class GenerateFrames:
    def __init__(self, model: str, completion: Completion, report_usage: bool) -> None:
        self._model = model
        self._completion = completion
        self._report_usage = report_usage
        self._id = uuid.uuid4().hex[:22]

    def response(
        self, text: str, output_tokens: int, finish: bool, parts: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        parts = parts if parts is not None else [{"text": text}]
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
        if finish:
            candidate["finishReason"] = FINISH_REASONS.get(self._completion.finish_reason, "STOP")
        candidate["index"] = 0
        doc: dict[str, Any] = {"candidates": [candidate]}
        if self._report_usage:
            completion = self._completion
            prompt = completion.prompt_tokens
            thoughts = completion.reasoning_tokens if finish else 0
            meta = {
                "promptTokenCount": prompt,
                "candidatesTokenCount": output_tokens,
                "totalTokenCount": prompt + output_tokens + thoughts,
            }
            # promptTokenCount includes the cached part; thoughts come beside candidates.
            if completion.cached_tokens:
                meta["cachedContentTokenCount"] = completion.cached_tokens
            if thoughts:
                meta["thoughtsTokenCount"] = thoughts
            doc["usageMetadata"] = meta
        doc.update(modelVersion=self._model, responseId=self._id)
        return doc

    @staticmethod
    def _frame(doc: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(doc) + b"\r\n\r\n"

    def head(self) -> bytes:
        return b""

    def calls(self, numbers: range) -> list[dict[str, Any]]:
        calls = self._completion.calls
        parts: list[dict[str, Any]] = []
        for n in numbers:
            call = calls[n]
            part: dict[str, Any] = {"functionCall": {"name": call.name, "args": call.args()}}
            if n == 0:  # as Gemini 3: the first call of a step is signed
                part["thoughtSignature"] = mock_signature(call.name, call.args())
            parts.append(part)
        return parts

    def token(self, index: int, text: str) -> bytes:
        if not self._completion.calls:
            return self._frame(self.response(text, index + 1, finish=False))
        # Gemini sends each call whole: on its first fragment, nothing after.
        number, first = self._completion.owner(index)
        if not first:
            return b""
        return self._frame(
            self.response("", index + 1, False, self.calls(range(number, number + 1)))
        )

    def tail(self) -> bytes:
        return self._frame(self.response("", len(self._completion.tokens), finish=True))

    def error(self) -> bytes:
        message = "The model is overloaded. Please try again later."
        return self._frame({"error": {"code": 503, "message": message, "status": "UNAVAILABLE"}})


def routes(server: MockServer) -> list[Route]:
    def authorize(request: Request) -> None:
        if server.api_key is None:
            return
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if not key:
            raise MockAPIError(
                403,
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to "
                "call this API.",
            )
        if not secret_matches(key, server.api_key):
            message = "API key not valid. Please pass a valid API key."
            raise MockAPIError(400, message, code="API_KEY_INVALID")

    async def generate(request: Request) -> Response:
        body = await server.accept(request)
        model, method = request.path_params["model"], request.path_params["method"]
        if method not in ("generateContent", "streamGenerateContent"):
            raise MockAPIError(404, f"method {method!r} is not found for this model")
        authorize(request)
        stream = method == "streamGenerateContent"
        if stream and request.query_params.get("alt") != "sse":
            raise MockAPIError(400, "mock: only alt=sse streaming is supported")
        body_doc = require_json(body)
        call = parse_generate_request(body_doc)
        if model not in server.models:
            version = request.url.path.split("/")[1]
            raise MockAPIError(
                404,
                f"models/{model} is not found for API version {version}, or is not supported "
                f"for {method}. Call ListModels to see the list of available models and "
                "their supported methods.",
            )
        completion, behaviour = server.plan(
            model, call.messages, request.headers, call.max_tokens, call.tools
        )
        if behaviour.require_signatures:
            check_signatures(body_doc)
        frames = GenerateFrames(model, completion, behaviour.report_usage)
        if stream:
            return server.stream(frames, completion, behaviour)
        await server.whole(request, completion, behaviour)
        parts = frames.calls(range(len(completion.calls))) if completion.calls else None
        return json_response(frames.response(completion.text, len(completion.tokens), True, parts))

    # Google serves both versions; the edge calls v1beta, google-genai defaults to v1.
    # The colon keeps OpenAI's `/v1/models/{id}` (no colon) out of these routes.
    return [
        Route(f"/{version}/models/{{model}}:{{method}}", generate, methods=["POST"])
        for version in API_VERSIONS
    ]
