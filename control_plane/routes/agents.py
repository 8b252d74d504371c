"""Agents (issue 15.4, DESIGN §11): ``/v1/admin/companies/{id}/agents[/{name}]`` for
the platform admin and the company's owners, ``GET /v1/agents`` for its users."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import agent_spec, agents
from control_plane.auth import authenticate, caller_and_json
from control_plane.deps import get_deps, path_id
from control_plane.middleware import request_id
from control_plane.pagination import key_page, key_page_request
from control_plane.responses import no_content, ok


def _path(request: Request) -> tuple[str, str]:
    return path_id(request, "company_id"), str(request.path_params.get("name", ""))


async def list_agents(request: Request) -> Response:
    """A company's agents, with their full definitions."""
    principal = await authenticate(request)
    company_id, _ = _path(request)
    req = key_page_request(request.query_params)
    page = await get_deps(request).db.transaction(
        lambda s: agents.list_all(s, principal, company_id, req).public(agents.agent_public)
    )
    return ok(page)


async def create_agent(request: Request) -> Response:
    """Define an agent: name, model, system prompt, tools, max_tokens, features."""
    principal, doc = await caller_and_json(request)
    deps = get_deps(request)
    company_id, _ = _path(request)
    fields = agent_spec.parse_agent(doc, create=True)
    rid = request_id(request)
    data = await deps.db.transaction(
        lambda s: agents.agent_public(
            agents.create(s, principal, deps.settings.catalog, company_id, fields, rid)
        )
    )
    return ok(data, 201)


async def get_agent(request: Request) -> Response:
    """One agent's definition."""
    principal = await authenticate(request)
    company_id, name = _path(request)
    data = await get_deps(request).db.transaction(
        lambda s: agents.agent_public(agents.get(s, principal, company_id, name))
    )
    return ok(data)


async def patch_agent(request: Request) -> Response:
    """Change an agent's model, system prompt, tools, max_tokens or features."""
    principal, doc = await caller_and_json(request)
    deps = get_deps(request)
    company_id, name = _path(request)
    fields = agent_spec.parse_agent(doc, create=False)
    rid = request_id(request)
    data = await deps.db.transaction(
        lambda s: agents.agent_public(
            agents.update(s, principal, deps.settings.catalog, company_id, name, fields, rid)
        )
    )
    return ok(data)


async def delete_agent(request: Request) -> Response:
    """Delete an agent (streams already started with it run to their end)."""
    principal = await authenticate(request)
    company_id, name = _path(request)
    rid = request_id(request)
    await get_deps(request).db.transaction(
        lambda s: agents.delete(s, principal, company_id, name, rid)
    )
    return no_content()


def _named(item: dict[str, Any]) -> str:
    return str(item["name"])


async def my_agents(request: Request) -> Response:
    """The agents the caller may chat with (POST /v1/chat/init with "agent")."""
    principal = await authenticate(request)
    deps = get_deps(request)
    req = key_page_request(request.query_params)
    items = await deps.db.transaction(lambda s: agents.usable(s, principal, deps.settings.catalog))
    return ok(key_page(items, _named, req).public(dict))


_ONE = "/v1/admin/companies/{company_id}/agents/{name}"
routes: list[BaseRoute] = [
    Route("/v1/agents", my_agents, methods=["GET"]),
    Route("/v1/admin/companies/{company_id}/agents", list_agents, methods=["GET"]),
    Route("/v1/admin/companies/{company_id}/agents", create_agent, methods=["POST"]),
    Route(_ONE, get_agent, methods=["GET"]),
    Route(_ONE, patch_agent, methods=["PATCH"]),
    Route(_ONE, delete_agent, methods=["DELETE"]),
]
