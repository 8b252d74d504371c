"""A small OpenAPI 3.1 document built from the route table: every path and method,
with the handler's docstring first line as its summary and the shared envelope and
error schemas. Enough for clients to discover the API; DESIGN.md is the contract."""

from __future__ import annotations

import inspect
import re
from typing import Any

from starlette.routing import BaseRoute, Route

from control_plane.openapi_schemas import BODIES, HEADERS, OPTIONAL_BODIES, QUERIES

_PATH_PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")

_ENVELOPE = {
    "type": "object",
    "properties": {"success": {"const": True}, "data": {}, "meta": {"type": "object"}},
    "required": ["success", "data"],
}
_ERROR = {
    "type": "object",
    "properties": {
        "success": {"const": False},
        "message": {"type": "string"},
        "error": {
            "type": "object",
            "properties": {"code": {"type": "string"}, "details": {"type": "object"}},
        },
    },
    "required": ["success", "message", "error"],
}


def _summary(route: Route) -> str:
    doc = inspect.getdoc(route.endpoint) or ""
    return doc.splitlines()[0] if doc else route.name.replace("_", " ")


def openapi_document(routes: list[BaseRoute]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route) or not route.include_in_schema:
            continue
        for method in sorted((route.methods or set()) - {"HEAD"}):
            key = (method.lower(), route.path)
            parameters = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in _PATH_PARAM.findall(route.path)
            ]
            parameters += QUERIES.get(key, []) + HEADERS.get(key, [])
            operation: dict[str, Any] = {}
            if parameters:
                operation["parameters"] = parameters
            if key in BODIES:
                operation["requestBody"] = {
                    "required": key not in OPTIONAL_BODIES,
                    "content": {"application/json": {"schema": BODIES[key]}},
                }
            paths.setdefault(route.path, {})[method.lower()] = {
                **operation,
                "summary": _summary(route),
                "operationId": f"{route.name}_{method.lower()}",
                "responses": {
                    "default": {
                        "description": "the envelope, or an error",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/Envelope"},
                                        {"$ref": "#/components/schemas/Error"},
                                    ]
                                }
                            }
                        },
                    }
                },
            }
    return {
        "openapi": "3.1.0",
        "info": {"title": "LLM Gateway control plane", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": {"Envelope": _ENVELOPE, "Error": _ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
