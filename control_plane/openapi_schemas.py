"""Request shapes for the OpenAPI document: bodies and query parameters per
operation. The handlers validate for themselves (`validation`, `chat_request`);
these schemas describe the same rules for clients and for the schemathesis run in
the test suite, which checks that no input, valid or not, gets a 500."""

from __future__ import annotations

from typing import Any

_STR = {"type": "string", "minLength": 1, "maxLength": 200}
_ID = {"type": "string", "minLength": 1, "maxLength": 64}
_CREDITS = {"type": "string", "pattern": r"^-?[0-9]{1,12}(\.[0-9]{1,6})?$"}
_CALL_ID = {"type": "string", "minLength": 1, "maxLength": 256}
_FUNCTION_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
# Tool calling in OpenAI's shapes (DESIGN §11, docs/tool-calls.md).
_TOOL_CALL = {
    "type": "object",
    "properties": {
        "id": _CALL_ID,
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "properties": {"name": _FUNCTION_NAME, "arguments": {"type": "string"}},
            "required": ["name", "arguments"],
        },
    },
    "required": ["id", "function"],
}
_TOOL = {
    "type": "object",
    "properties": {
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "properties": {
                "name": _FUNCTION_NAME,
                "description": {"type": "string"},
                "parameters": {"type": "object"},
                "strict": {"type": "boolean"},
            },
            "required": ["name"],
        },
    },
    "required": ["type", "function"],
}
_TOOL_CHOICE = {
    "anyOf": [
        {"enum": ["none", "auto", "required"]},
        {
            "type": "object",
            "properties": {
                "type": {"enum": ["function"]},
                "function": {
                    "type": "object",
                    "properties": {"name": _FUNCTION_NAME},
                    "required": ["name"],
                },
            },
            "required": ["type", "function"],
        },
    ]
}
_TOOL_RESULT = {
    "type": "object",
    "properties": {"tool_call_id": _CALL_ID, "content": {"type": "string", "maxLength": 2000}},
    "required": ["tool_call_id", "content"],
}
_MESSAGE = {
    "type": "object",
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        # null only beside an assistant's `tool_calls`
        "content": {"anyOf": [{"type": "string", "maxLength": 2000}, {"type": "null"}]},
        "tool_calls": {"type": "array", "items": _TOOL_CALL, "minItems": 1, "maxItems": 128},
        "tool_call_id": _CALL_ID,
    },
    "required": ["role", "content"],
}
_SCOPES = {
    "type": "array",
    "items": {"enum": ["llm:chat:send", "llm:chat:read", "llm:chat:delete"]},
    "minItems": 1,
}
_MODEL_SPEC = {
    "type": "object",
    "properties": {
        "provider": {"type": "string"},
        "upstream_model": _STR,
        "context_length": {"type": "integer", "minimum": 1},
        "max_output_tokens": {"type": "integer", "minimum": 1},
        "features": {"type": "array", "items": {"type": "string"}},
        "price": {
            "type": "object",
            "properties": {
                "input_per_mtok": {"type": "string"},
                "output_per_mtok": {"type": "string"},
                "cached_input_per_mtok": {"type": "string"},
                "cache_write_per_mtok": {"type": "string"},
            },
        },
        "enabled": {"type": "boolean"},
        # Issue 16.2: other models of the company's view, tried in order before the
        # first byte when this one fails.
        "fallbacks": {"type": "array", "items": _STR, "maxItems": 5, "uniqueItems": True},
    },
    "additionalProperties": False,
}

# Budgets (DESIGN §11): amounts are non-negative credits.
_AMOUNT = {"type": "string", "pattern": r"^[0-9]{1,12}(\.[0-9]{1,6})?$"}
_BUDGET_SCOPE = {"enum": ["user", "api_key", "team"]}
_PERIOD = {"enum": ["day", "week", "month", "none"]}
_USER_IDS = {"type": "array", "items": _ID, "maxItems": 1000}


# Agents (issue 15.4): `control_plane.agent_spec` holds the rules.
_AGENT_NAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,63}$"}
_AGENT_TOOL = {
    "type": "object",
    "properties": {
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "description": {"type": "string"},
                "parameters": {"type": "object"},
            },
            "required": ["name"],
        },
    },
    "required": ["type", "function"],
}
_AGENT_FIELDS: dict[str, Any] = {
    "model": {"type": ["string", "null"], "minLength": 1, "maxLength": 200},
    "system_prompt": {"type": ["string", "null"], "minLength": 1, "maxLength": 32000},
    "tools": {
        "type": ["array", "null"],
        "items": _AGENT_TOOL,
        "minItems": 1,
        "maxItems": 128,
        "description": "At most 64 KiB as compact JSON; a company's prompts and tools "
        "together at most 2 MiB.",
    },
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "features": {"type": ["array", "null"], "items": {"type": "string"}, "maxItems": 16},
}


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required}


# Operations whose body may be left out altogether.
OPTIONAL_BODIES = {("post", "/v1/admin/signing-keys/rotate"), ("post", "/v1/auth/logout")}

BODIES: dict[tuple[str, str], dict[str, Any]] = {
    # Optional: a bare POST rotates, retiring only keys whose tokens have all expired.
    ("post", "/v1/admin/signing-keys/rotate"): _obj([], retire_others={"type": "boolean"}),
    ("post", "/v1/auth/login"): _obj(
        ["email", "password"], email={"type": "string", "format": "email"}, password=_STR
    ),
    # Optional and empty: no field names a token, only the one presented is ended.
    ("post", "/v1/auth/logout"): {**_obj([]), "additionalProperties": False},
    ("post", "/v1/chat/init"): _obj(
        [],
        agent=_AGENT_NAME,
        model=_STR,
        messages={"type": "array", "items": _MESSAGE, "minItems": 1},
        query={"type": "string", "minLength": 1, "maxLength": 2000},
        session_id=_ID,
        max_tokens={"type": "integer", "minimum": 1},
        temperature={"type": "number", "minimum": 0, "maximum": 2},
        top_p={"type": "number", "minimum": 0, "maximum": 1},
        presence_penalty={"type": "number", "minimum": -2, "maximum": 2},
        frequency_penalty={"type": "number", "minimum": -2, "maximum": 2},
        seed={"type": "integer"},
        user={"type": "string", "minLength": 1, "maxLength": 256},
        stop={"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
        features={"type": "array", "items": {"type": "string"}},
        tools={"type": "array", "items": _TOOL, "minItems": 1, "maxItems": 128},
        tool_choice=_TOOL_CHOICE,
        parallel_tool_calls={"type": "boolean"},
        tool_results={"type": "array", "items": _TOOL_RESULT, "minItems": 1, "maxItems": 128},
    ),
    ("post", "/v1/webhooks/usage"): _obj(["type", "data"], type=_STR, data={"type": "object"}),
    ("post", "/v1/admin/companies"): _obj(["name"], name=_STR, credits=_CREDITS),
    ("post", "/v1/admin/companies/{company_id}/credits"): _obj(
        ["amount"], amount=_CREDITS, reason={"type": "string", "maxLength": 500}
    ),
    ("post", "/v1/admin/companies/{company_id}/adjustments"): _obj(
        ["amount", "reason"], amount=_CREDITS, reason={"type": "string", "maxLength": 500}
    ),
    ("post", "/v1/admin/users"): _obj(
        ["company_id", "email", "role"],
        company_id=_ID,
        email={"type": "string", "format": "email"},
        password={"type": "string", "minLength": 4, "maxLength": 1024},
        role={"enum": ["member", "owner", "admin"]},
    ),
    ("patch", "/v1/admin/users/{user_id}"): {
        **_obj(
            ["role"],
            role={"enum": ["member", "owner", "admin"]},
            # Only with a promotion to admin, by the platform admin (`accounts.set_role`).
            password={"type": "string", "minLength": 4, "maxLength": 1024},
        ),
        "additionalProperties": False,
    },
    ("post", "/v1/admin/api-keys"): _obj(["user_id"], user_id=_ID, scopes=_SCOPES),
    ("put", "/v1/admin/companies/{company_id}/providers/{provider}"): {
        **_obj(
            [],
            api_key={"type": ["string", "null"], "maxLength": 4096},
            # Issue 16.1: a key pool (instead of api_key); shown back by id and state only.
            api_keys={
                "type": ["array", "null"],
                "items": {"type": "string", "maxLength": 4096},
                "minItems": 1,
                "maxItems": 20,
                "uniqueItems": True,
            },
            default_model={"type": ["string", "null"]},
            models={"type": "object", "additionalProperties": _MODEL_SPEC},
        ),
        "additionalProperties": False,
    },
    ("post", "/v1/admin/companies/{company_id}/budgets"): {
        **_obj(
            ["scope", "target_id", "amount", "period"],
            scope=_BUDGET_SCOPE,
            target_id=_ID,
            amount=_AMOUNT,
            period=_PERIOD,
        ),
        "additionalProperties": False,
    },
    ("patch", "/v1/admin/companies/{company_id}/budgets/{budget_id}"): {
        **_obj([], amount=_AMOUNT, period=_PERIOD),
        "additionalProperties": False,
        "minProperties": 1,
    },
    ("post", "/v1/admin/companies/{company_id}/teams"): {
        **_obj(["name"], name=_STR, user_ids=_USER_IDS),
        "additionalProperties": False,
    },
    ("patch", "/v1/admin/companies/{company_id}/teams/{team_id}"): {
        **_obj([], name=_STR, user_ids=_USER_IDS),
        "additionalProperties": False,
        "minProperties": 1,
    },
    ("put", "/v1/admin/companies/{company_id}/webhook"): {
        **_obj(["url"], url={"type": "string", "format": "uri", "maxLength": 2000}),
        "additionalProperties": False,
    },
    ("post", "/v1/admin/revocations"): {
        "type": "object",
        "properties": {
            "user_id": _ID,
            "company_id": _ID,
            "jti": _ID,
            "reason": {"type": "string", "maxLength": 500},
        },
        "oneOf": [{"required": ["user_id"]}, {"required": ["company_id"]}, {"required": ["jti"]}],
    },
    ("post", "/v1/admin/companies/{company_id}/agents"): {
        **_obj(["name"], name=_AGENT_NAME, **_AGENT_FIELDS),
        "additionalProperties": False,
    },
    ("patch", "/v1/admin/companies/{company_id}/agents/{name}"): {
        **_obj([], **_AGENT_FIELDS),
        "additionalProperties": False,
    },
}

_LIMIT = {
    "name": "limit",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": 200},
}
_CURSOR = {"name": "cursor", "in": "query", "schema": {"type": "string"}}


def _query(name: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": {"type": "string"}}


def _day(name: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": {"type": "string", "format": "date"}}


QUERIES: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("get", "/v1/models"): [_query("provider")],
    ("get", "/v1/sessions"): [_LIMIT, _CURSOR],
    ("get", "/v1/sessions/{session_id}"): [_LIMIT, _CURSOR],
    ("get", "/v1/usage"): [_LIMIT, _CURSOR],
    ("get", "/v1/credits"): [_LIMIT, _CURSOR],
    ("get", "/v1/admin/audit"): [
        _query("company_id"),
        _query("kind"),
        _query("actor"),
        _query("target"),
        _query("request_id"),
        _query("reservation_id"),
        _day("from"),
        _day("to"),
        _LIMIT,
        _CURSOR,
    ],
    ("get", "/v1/usage/summary"): [
        _query("company_id"),
        {"name": "group_by", "in": "query", "schema": {"type": "string"}},
        _day("from"),
        _day("to"),
        {"name": "order", "in": "query", "schema": {"enum": ["keys", "cost"]}},
        _LIMIT,
        _CURSOR,
    ],
    ("get", "/v1/usage/ttft"): [_query("company_id"), _day("from"), _day("to")],
    ("get", "/v1/admin/companies"): [_LIMIT, _CURSOR],
    ("get", "/v1/admin/users"): [_query("company_id"), _LIMIT, _CURSOR],
    ("get", "/v1/admin/api-keys"): [_query("user_id"), _query("company_id"), _LIMIT, _CURSOR],
    ("get", "/v1/admin/revocations"): [_query("company_id"), _LIMIT, _CURSOR],
    ("get", "/v1/agents"): [_LIMIT, _CURSOR],
    ("get", "/v1/admin/companies/{company_id}/agents"): [_LIMIT, _CURSOR],
    ("get", "/v1/admin/companies/{company_id}/budgets"): [_LIMIT, _CURSOR],
    ("get", "/v1/admin/companies/{company_id}/teams"): [_LIMIT, _CURSOR],
    ("get", "/v1/admin/companies/{company_id}/providers"): [_LIMIT, _CURSOR],
}

HEADERS: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("post", "/v1/admin/companies/{company_id}/credits"): [
        {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}
    ],
    ("post", "/v1/admin/companies/{company_id}/adjustments"): [
        {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}
    ],
}
