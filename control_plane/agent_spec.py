"""An agent's definition, validated (pure; issue 15.4, DESIGN §11 "Agents").

An agent is a name, a model (None: the company's default), a system prompt, the
tools it may call, its own `max_tokens` cap and the features it needs. `parse_agent`
checks a body's shape; `check_model` checks the definition against the model it
resolves to, both when it is saved and (the catalog may change) at each init.

Tools are checked by `shared.tool_shapes.check_tools`, the validator the services
apply to a request's ``tools``, so an agent can never store what a request could not
send. The system prompt is capped: it is sent, and held for, on every turn.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from control_plane.errors import UnsupportedFeature, ValidationFailed
from shared.catalog import ModelSpec
from shared.input_size import InputRejected, estimate_input_tokens, json_too_deep, params_tokens
from shared.tool_shapes import check_tools

FIELDS = ("name", "model", "system_prompt", "tools", "max_tokens", "features")
# A slug: what goes in a URL path and a CLI argument without quoting.
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
SYSTEM_PROMPT_MAX_CHARS = 32_000
MAX_FEATURES = 16
MODEL_ID_MAX = 200
# Tools ride every turn and every listing reads them: bounded in bytes (compact JSON),
# as the prompt is in characters, so one definition costs a listing little.
TOOLS_MAX_BYTES = 64 * 1024
# The stash nests tools two levels below the request body (``params.tools``); keep
# that within the body depth every service accepts.
STASH_DEPTH = 62


def parse_name(value: Any) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ValidationFailed(
            "name", "must be 1-64 lowercase letters, digits, '-' or '_', starting alphanumeric"
        )
    return value


def _model(value: Any) -> str | None:
    if value is None:
        return None  # the company's default model, whatever it is at init
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MODEL_ID_MAX
        or any(c.isspace() for c in value)
    ):
        raise ValidationFailed("model", f"must be a model id (1-{MODEL_ID_MAX} characters) or null")
    return value


def _system_prompt(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValidationFailed("system_prompt", "must be a non-empty string or null")
    if len(value) > SYSTEM_PROMPT_MAX_CHARS:
        raise ValidationFailed(
            "system_prompt", f"must be at most {SYSTEM_PROMPT_MAX_CHARS} characters"
        )
    return value


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    try:
        tools = check_tools(value)
    except InputRejected as exc:
        raise ValidationFailed(exc.where, exc.problem) from None
    if json_too_deep(tools, STASH_DEPTH):
        raise ValidationFailed("tools", f"must not nest more than {STASH_DEPTH} levels deep")
    if len(orjson.dumps(tools)) > TOOLS_MAX_BYTES:
        raise ValidationFailed("tools", f"must be at most {TOOLS_MAX_BYTES} bytes as JSON")
    return tools


def _max_tokens(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
        raise ValidationFailed("max_tokens", "must be a positive integer or null")
    return value


def _features(value: Any) -> list[str]:
    if value is None:
        return []
    if (
        not isinstance(value, list)
        or len(value) > MAX_FEATURES
        or not all(isinstance(f, str) and 0 < len(f) <= 50 for f in value)
    ):
        raise ValidationFailed("features", f"must be at most {MAX_FEATURES} feature names")
    return list(dict.fromkeys(value))


_PARSERS: dict[str, Any] = {
    "model": _model,
    "system_prompt": _system_prompt,
    "tools": _tools,
    "max_tokens": _max_tokens,
    "features": _features,
}


def parse_agent(doc: dict[str, Any], *, create: bool) -> dict[str, Any]:
    """The fields a create (``name`` required) or a PATCH (``name`` fixed: it is the
    agent's address) sets, validated; a field given as null is cleared."""
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise ValidationFailed(unknown[0], f"is not an agent field ({', '.join(FIELDS)})")
    fields: dict[str, Any] = {}
    if create:
        fields["name"] = parse_name(doc.get("name"))
    elif "name" in doc:
        raise ValidationFailed("name", "cannot change; create a new agent and delete this one")
    for key, parse in _PARSERS.items():
        if key in doc:
            fields[key] = parse(doc[key])
    return fields


def needed_features(features: list[str], tools: list[dict[str, Any]] | None) -> tuple[str, ...]:
    """What the model must support: the declared features, and `tools` for tools."""
    return tuple(dict.fromkeys([*features, *(["tools"] if tools else [])]))


def definition_bytes(system_prompt: str | None, tools: list[dict[str, Any]] | None) -> int:
    """What a definition weighs in a listing: its prompt and tools, as stored."""
    prompt = len(system_prompt.encode("utf-8")) if system_prompt else 0
    return prompt + (len(orjson.dumps(tools)) if tools else 0)


def system_messages(system_prompt: str | None) -> list[dict[str, Any]]:
    return [{"role": "system", "content": system_prompt}] if system_prompt else []


def fixed_input_tokens(system_prompt: str | None, tools: list[dict[str, Any]] | None) -> int:
    """What the agent adds to every request's input estimate (`shared.input_size`)."""
    return estimate_input_tokens(system_messages(system_prompt)) + params_tokens(
        {"tools": tools} if tools else {}
    )


def check_model(
    model: ModelSpec,
    *,
    features: list[str],
    tools: list[dict[str, Any]] | None,
    system_prompt: str | None,
    max_tokens: int | None,
) -> None:
    """The definition fits `model`: 422 ``unsupported_feature`` for a feature it lacks,
    422 when the cap exceeds its output or the prompt and tools leave no room."""
    missing = [f for f in needed_features(features, tools) if f not in model.features]
    if missing:
        raise UnsupportedFeature(
            f"{model.id} does not support {', '.join(missing)} "
            f"(it supports {', '.join(model.features) or 'nothing extra'})."
        )
    if max_tokens is not None and max_tokens > model.max_output_tokens:
        raise ValidationFailed(
            "max_tokens", f"must be at most {model.max_output_tokens} for {model.id}"
        )
    fixed = fixed_input_tokens(system_prompt, tools)
    if fixed + 1 >= model.context_length:
        raise ValidationFailed(
            "system_prompt",
            f"with the tools is about {fixed} tokens, which leaves no room in "
            f"{model.id}'s context of {model.context_length}",
        )
