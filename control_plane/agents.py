"""A company's agents: the admin use cases, the caller's list, and what init applies.

Each function takes a DB session and does not commit (the handler's transaction
does), checks its policy against the rows it touches, and writes an audit event
for every change in the same transaction (``admin.agent.created|updated|deleted``).

Who: the platform admin and a company's owners manage its agents; its members may
list and use them (403 when they try to manage); anyone else is told there is no
such company or agent (404), so one company cannot learn another's agent names.

At init (`for_init`) the agent's model, system prompt and tools replace the body's:
the model is resolved in the company's catalog as it is now (a model the company
disabled is 403 ``model_not_allowed``; features are checked again, since the catalog
may have changed since the agent was saved).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import agent_spec, audit, company_llm, policy
from control_plane.accounts import actor_of
from control_plane.chat_request import InitRequest
from control_plane.company_llm import CompanyCatalog
from control_plane.errors import (
    AgentExists,
    AgentNotFound,
    AppError,
    Forbidden,
    ModelNotAllowed,
    ModelNotFound,
    NotFound,
    ValidationFailed,
)
from control_plane.pagination import KeyPageRequest, Page, read_key_page
from control_plane.policy import Principal
from control_plane.tables import Agent, Company, iso, new_id, utcnow
from shared.catalog import Catalog, ModelSpec

MAX_AGENTS_PER_COMPANY = 200
# Every listing (`GET /v1/agents`, a member's) reads and checks every definition: all of
# a company's prompts and tools together are bounded, so a listing stays milliseconds
# of work whatever an owner stores (each alone is bounded by `agent_spec`).
MAX_DEFINITION_BYTES_PER_COMPANY = 2 * 1024 * 1024


def agent_public(agent: Agent) -> dict[str, Any]:
    """The full definition, for those who manage it."""
    return {
        "name": agent.name,
        "model": agent.model,
        "system_prompt": agent.system_prompt,
        "tools": agent.tools,
        "max_tokens": agent.max_tokens,
        "features": list(agent.features),
        "created_at": iso(agent.created_at),
        "updated_at": iso(agent.updated_at),
    }


def _managed_company(session: Session, p: Principal, company_id: str) -> Company:
    """The company whose agents `p` manages: 403 for its own users who may not, 404
    for everyone else (another company's agents are not there for them)."""
    company = session.get(Company, company_id)
    manages = policy.can_manage_agents(p, company_id)
    if company is None or not (manages or p.company_id == company_id):
        raise NotFound("No such company.")
    if not manages:
        raise Forbidden("Only an owner of the company (with llm:admin) manages its agents.")
    return company


def _find(session: Session, company_id: str, name: str) -> Agent | None:
    return session.scalars(
        select(Agent).where(col(Agent.company_id) == company_id).where(col(Agent.name) == name)
    ).first()


def _catalog_of(session: Session, catalog: Catalog, company: Company) -> CompanyCatalog:
    """The company's catalog as its admin views see it (`admin_llm`)."""
    return company_llm.company_catalog(
        catalog,
        company_llm.load_overrides(session, company.id),
        company.default_model,
        company_llm.keyed_providers(session, company.id),
    )


def _check(session: Session, catalog: Catalog, company: Company, agent: Agent) -> None:
    """The definition against the model it resolves to now (422 when it cannot run)."""
    cat = _catalog_of(session, catalog, company)
    model = cat.model(agent.model if agent.model is not None else cat.default_model)
    if model is None:
        raise ValidationFailed("model", f"{agent.model!r} is not a usable model for this company")
    agent_spec.check_model(
        model,
        features=list(agent.features),
        tools=agent.tools,
        system_prompt=agent.system_prompt,
        max_tokens=agent.max_tokens,
    )


def _lock_company(session: Session, company_id: str) -> None:
    """Agents are counted and weighed under the company's row lock (PostgreSQL), so
    two concurrent saves cannot both pass the caps."""
    session.execute(select(col(Company.id)).where(col(Company.id) == company_id).with_for_update())


def _check_room(session: Session, agent: Agent) -> None:
    others = session.execute(
        select(col(Agent.system_prompt), col(Agent.tools))
        .where(col(Agent.company_id) == agent.company_id)
        .where(col(Agent.id) != agent.id)
    )
    total = sum(agent_spec.definition_bytes(prompt, tools) for prompt, tools in others)
    total += agent_spec.definition_bytes(agent.system_prompt, agent.tools)
    if total > MAX_DEFINITION_BYTES_PER_COMPANY:
        raise ValidationFailed(
            "tools",
            f"the company's agents would hold {total:,} bytes of prompts and tools; "
            f"at most {MAX_DEFINITION_BYTES_PER_COMPANY:,} in all",
        )


def _audit(
    session: Session, p: Principal, action: str, agent: Agent, request_id: str, changed: list[str]
) -> None:
    # The prompt and tools themselves stay out of the log: the fields say what changed.
    audit.record(
        session,
        actor=actor_of(p),
        action=f"admin.agent.{action}",
        company_id=agent.company_id,
        request_id=request_id,
        details={"agent": agent.name, "model": agent.model, "fields": changed},
    )


def create(
    session: Session,
    p: Principal,
    catalog: Catalog,
    company_id: str,
    fields: dict[str, Any],
    request_id: str,
    now: datetime | None = None,
) -> Agent:
    company = _managed_company(session, p, company_id)
    _lock_company(session, company.id)
    if _find(session, company.id, fields["name"]) is not None:
        raise AgentExists(f"The company already has an agent named {fields['name']!r}.")
    count = session.scalar(
        select(func.count()).select_from(Agent).where(col(Agent.company_id) == company.id)
    )
    if int(count or 0) >= MAX_AGENTS_PER_COMPANY:
        raise ValidationFailed("name", f"a company has at most {MAX_AGENTS_PER_COMPANY} agents")
    moment = now or utcnow()
    agent = Agent(
        id=new_id(),
        company_id=company.id,
        name=fields["name"],
        model=fields.get("model"),
        system_prompt=fields.get("system_prompt"),
        tools=fields.get("tools"),
        max_tokens=fields.get("max_tokens"),
        features=fields.get("features", []),
        created_at=moment,
        updated_at=moment,
    )
    _check(session, catalog, company, agent)
    _check_room(session, agent)
    session.add(agent)
    try:
        session.flush()
    except IntegrityError:  # created concurrently under the same name
        raise AgentExists(f"The company already has an agent named {agent.name!r}.") from None
    _audit(session, p, "created", agent, request_id, sorted(fields))
    return agent


def get(session: Session, p: Principal, company_id: str, name: str, *, lock: bool = False) -> Agent:
    """The agent `name`; `lock`: for a change, found under the company's row lock, so
    a change or delete at once with a delete waits and then finds it gone (404)
    instead of writing to a row no longer there (no row changed, a second
    deletion audited)."""
    company = _managed_company(session, p, company_id)
    if lock:
        _lock_company(session, company.id)
    agent = _find(session, company.id, name)
    if agent is None:
        raise AgentNotFound(f"No agent named {name[:64]!r}.")
    return agent


def list_all(session: Session, p: Principal, company_id: str, req: KeyPageRequest) -> Page[Agent]:
    """A page of the company's agents by name."""
    company = _managed_company(session, p, company_id)
    stmt = select(Agent).where(col(Agent.company_id) == company.id)
    return read_key_page(session, stmt, col(Agent.name), req)


def update(
    session: Session,
    p: Principal,
    catalog: Catalog,
    company_id: str,
    name: str,
    fields: dict[str, Any],
    request_id: str,
) -> Agent:
    agent = get(session, p, company_id, name, lock=True)
    company = session.get(Company, agent.company_id)
    assert company is not None
    for key, value in fields.items():
        setattr(agent, key, value)
    _check(session, catalog, company, agent)
    _check_room(session, agent)
    agent.updated_at = utcnow()
    session.flush()
    _audit(session, p, "updated", agent, request_id, sorted(fields))
    return agent


def delete(session: Session, p: Principal, company_id: str, name: str, request_id: str) -> None:
    agent = get(session, p, company_id, name, lock=True)
    _audit(session, p, "deleted", agent, request_id, [])
    session.delete(agent)
    session.flush()


# --- the caller's agents ------------------------------------------------------------


def usable(session: Session, p: Principal, catalog: Catalog) -> list[dict[str, Any]]:
    """``GET /v1/agents``: the caller's company's agents that can run now, as a member
    sees them (the model they resolve to, the cap, the tool names; not the prompt)."""
    if p.company_id is None or not policy.can_use_agents(p, p.company_id):
        raise Forbidden("This needs a user with the llm:chat:send scope.")
    company = session.get(Company, p.company_id)
    if company is None:
        raise Forbidden("Your company no longer exists.")
    cat = _catalog_of(session, catalog, company)
    items: list[dict[str, Any]] = []
    for agent in session.scalars(
        select(Agent).where(col(Agent.company_id) == company.id).order_by(col(Agent.name))
    ):
        try:
            model = _resolve(cat, agent)
            _check_at_init(model, agent)
        except AppError:  # disabled, gone, or no longer fits the model: not usable now
            continue
        items.append(
            {
                "name": agent.name,
                "model": model.id,
                "max_tokens": _cap(model, agent),
                "features": list(agent_spec.needed_features(list(agent.features), agent.tools)),
                "tool_names": [t["function"]["name"] for t in agent.tools or []],
            }
        )
    return items


# --- init ----------------------------------------------------------------------------


def _resolve(cat: CompanyCatalog, agent: Agent) -> ModelSpec:
    if agent.model is not None and agent.model in cat.disabled:
        raise ModelNotAllowed(f"Your company cannot use {agent.model!r} (agent {agent.name!r}).")
    model = cat.model(agent.model if agent.model is not None else cat.default_model)
    if model is None:
        raise ModelNotFound(f"Agent {agent.name!r} uses {agent.model!r}, which no longer exists.")
    return model


def _cap(model: ModelSpec, agent: Agent) -> int | None:
    """The agent's output cap on `model` (a catalog change may have lowered the model's)."""
    return None if agent.max_tokens is None else min(agent.max_tokens, model.max_output_tokens)


def _check_at_init(model: ModelSpec, agent: Agent) -> None:
    agent_spec.check_model(
        model,
        features=list(agent.features),
        tools=agent.tools,
        system_prompt=agent.system_prompt,
        max_tokens=_cap(model, agent),
    )


@dataclass(frozen=True, slots=True)
class AgentTurn:
    """An init request with its agent applied, and the messages that go before the
    conversation (the system prompt: sent on every turn, never stored)."""

    request: InitRequest
    prefix: list[dict[str, Any]]


def for_init(session: Session, cat: CompanyCatalog, company_id: str, req: InitRequest) -> AgentTurn:
    """`req` with the agent's model, tools, features and cap. `parse_init_request`
    already refused a body that tries to set the model, tools or a system message."""
    assert req.agent is not None
    agent = _find(session, company_id, req.agent)
    if agent is None:
        raise AgentNotFound(f"No agent named {req.agent[:64]!r}.")
    model = _resolve(cat, agent)
    _check_at_init(model, agent)
    cap = _cap(model, agent)
    max_tokens = req.max_tokens
    if cap is not None:
        if max_tokens is not None and max_tokens > cap:
            raise ValidationFailed("max_tokens", f"must be at most {cap} for agent {agent.name}")
        max_tokens = max_tokens or cap
    params = {**req.params, **({"tools": agent.tools} if agent.tools else {})}
    needed = agent_spec.needed_features(list(agent.features), agent.tools)
    features = tuple(dict.fromkeys([*req.features, *needed]))
    applied = dataclasses.replace(
        req, model=model.id, params=params, features=features, max_tokens=max_tokens
    )
    return AgentTurn(applied, agent_spec.system_messages(agent.system_prompt))
