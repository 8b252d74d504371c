"""Scripted tool calls: ``[[mock tool_calls=N]]`` makes the answer N calls (pure).

The calls go to the request's declared tools in turn, with arguments made up from
each tool's JSON Schema (a word for a string, a small number for a number, ``true``
for a boolean), seeded by the prompt so the same request gets the same calls. The
arguments text is played as fragments of a few characters, one per "token", so a
stream splits it mid-string as real vendors do. A conversation whose last message is
a tool result gets an ordinary text answer: the loop ends.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

FRAGMENT_CHARS = 5
MAX_CALLS = 16
_WORDS = ("Paris", "Tōkyo", "Lagos", "Lima", "Oslo", "Hanoi", "Quito", "Perth")


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A declared tool: its name and its parameters' (name, JSON type) pairs."""

    name: str
    properties: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, name: Any, schema: Any) -> ToolSpec | None:
        if not isinstance(name, str) or not name:
            return None
        props = schema.get("properties") if isinstance(schema, dict) else None
        # Lower case: Gemini's Schema spells its types `INTEGER`, JSON Schema `integer`.
        pairs = tuple(
            (key, str(value.get("type", "string")).lower() if isinstance(value, dict) else "string")
            for key, value in (props.items() if isinstance(props, dict) else [])
        )
        return cls(name, pairs)


@dataclass(frozen=True, slots=True)
class PlannedCall:
    id: str
    name: str
    arguments: str  # the whole JSON text

    @property
    def fragments(self) -> list[str]:
        text = self.arguments
        return [text[i : i + FRAGMENT_CHARS] for i in range(0, len(text), FRAGMENT_CHARS)]

    def args(self) -> dict[str, Any]:
        value: dict[str, Any] = orjson.loads(self.arguments)
        return value


def _value(kind: str, seed: int) -> Any:
    if kind in ("integer", "number"):
        return seed % 7 + 1
    if kind == "boolean":
        return True
    return _WORDS[seed % len(_WORDS)]


def plan_calls(prompt: str, tools: tuple[ToolSpec, ...], count: int) -> tuple[PlannedCall, ...]:
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
    calls = []
    for i in range(min(count, MAX_CALLS)):
        tool = tools[i % len(tools)]
        seed = int(digest[i * 2 : i * 2 + 8], 16)
        args = {name: _value(kind, seed + j) for j, (name, kind) in enumerate(tool.properties)}
        call_id = f"call_{digest[i : i + 20]}{i:02d}"
        calls.append(PlannedCall(call_id, tool.name, orjson.dumps(args).decode()))
    return tuple(calls)


def mock_signature(name: str, args: Any) -> str:
    """The `thoughtSignature` the mock's Gemini gives a call: base64 (as Google's are)
    of a digest of the call, so the same call always gets the same one."""
    body = orjson.dumps([name, args], option=orjson.OPT_SORT_KEYS)
    return base64.b64encode(b"mock-thought:" + hashlib.sha256(body).digest()).decode()


def openai_tools(value: Any) -> tuple[ToolSpec, ...]:
    """OpenAI's ``tools`` (also the in-house convention's)."""
    specs = []
    for tool in value if isinstance(value, list) else []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict):
            spec = ToolSpec.of(function.get("name"), function.get("parameters"))
            if spec is not None:
                specs.append(spec)
    return tuple(specs)
