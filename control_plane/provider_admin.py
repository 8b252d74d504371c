"""A company's own providers as its admins manage them (``/v1/admin/companies/{id}
/providers…``): configure one (key pool, models, default model), list them, remove
one, each audited with what it looked like before and after.

A view never holds a key, only ``has_key`` and each pooled key's id; the state the
edges recorded for each key (`with_key_states`) comes from the shared store. Data
functions take a DB session and do not commit (the route owns the transaction);
the rules of what may be stored are `company_llm`'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cryptography.fernet import MultiFernet
from sqlalchemy.orm import Session

from control_plane import accounts, audit, company_llm, policy
from control_plane.errors import NotFound, ValidationFailed
from control_plane.fallbacks import check_token_room, sealed_size
from control_plane.policy import Principal
from control_plane.tables import Company
from shared.catalog import Catalog, ModelSpec
from shared.key_pool import company_scope, parse_state, state_key
from shared.route_claim import UpstreamRoute
from shared.store import KeyValueStore

UNSET: Any = object()
"""A field the request left out: what is stored stays (unlike ``null``, which clears)."""


@dataclass(frozen=True)
class Change:
    """One ``PUT …/providers/{provider}``, parsed: each field a value, None or UNSET."""

    provider: str
    api_keys: Any  # list[str], None (back to the platform's keys) or UNSET
    models: dict[str, dict[str, Any]] | None
    default_model: Any  # str, None or UNSET


@dataclass(frozen=True)
class Caller:
    """Who asks, and what each use case needs to read and write a company's keys."""

    principal: Principal
    request_id: str | None
    catalog: Catalog
    fernet: MultiFernet


def _company(session: Session, p: Principal, company_id: str, *, lock: bool = False) -> Company:
    """The company `p` configures; 404 otherwise. `lock`: a change takes the company
    row first, so two changes at once queue: each reads the provider and model rows
    the one before it committed, where both found none and both inserted one (the
    second broke `uq_company_providers_company_provider` or `uq_company_models_…`: a
    500)."""
    if not policy.can_configure_llm(p, company_id):
        raise NotFound("No such company.")
    company = session.get(Company, company_id, with_for_update=lock)
    if company is None:
        raise NotFound("No such company.")
    return company


def _view(
    session: Session,
    c: Caller,
    company: Company,
    provider: str,
    *,
    with_overrides: bool = False,
) -> dict[str, Any]:
    row = company_llm.provider_row(session, company.id, provider)
    overrides = company_llm.load_overrides(session, company.id)
    keyed = company_llm.keyed_providers(session, company.id)
    view = company_llm.company_catalog(c.catalog, overrides, company.default_model, keyed)
    mine = [o for o in overrides if o.provider == provider]
    shown: dict[str, Any] = {
        "provider": provider,
        "has_key": row is not None and row.api_key_encrypted is not None,
        "keys": [{"id": kid} for kid in company_llm.key_ids(c.fernet, row)],
        "default_model": view.default_model,
        "models": [
            {**spec.public(), "enabled": True}
            if (spec := view.model(o.model_id)) is not None
            else {"id": o.model_id, "provider": provider, "enabled": False}
            for o in mine
        ],
    }
    if with_overrides:
        # The company's own override of each model, as sent (no secret in it): what a
        # client edits and sends back, since ``models`` replaces them all.
        shown["overrides"] = {o.model_id: o.spec for o in mine}
    return shown


def _usable_view(session: Session, c: Caller, company_id: str) -> company_llm.CompanyCatalog:
    overrides = company_llm.load_overrides(session, company_id)
    keyed = company_llm.keyed_providers(session, company_id)
    return company_llm.company_catalog(c.catalog, overrides, None, keyed)


def _apply(session: Session, c: Caller, company: Company, change: Change) -> None:
    provider = change.provider
    before = _token_sizes(session, c, company.id)
    spec = c.catalog.providers[provider]
    if change.api_keys is not UNSET and change.api_keys is not None:
        company_llm.check_own_key(spec)
    row = company_llm.provider_row(session, company.id, provider)
    # A key stored before `takes_own_key` refused it counts as none.
    stored = row is not None and row.api_key_encrypted is not None
    has_key = stored and company_llm.takes_own_key(spec)
    if not (has_key if change.api_keys is UNSET else change.api_keys is not None):
        # On the platform's key: what is sent now, or else what stays stored, must be
        # something that key can carry (`company_llm.own_key_field`).
        kept = change.models
        if kept is None:
            overrides = company_llm.load_overrides(session, company.id)
            kept = {o.model_id: o.spec for o in overrides if o.provider == provider}
        company_llm.check_platform_key(provider, kept, c.catalog)
    if change.api_keys is not UNSET:
        company_llm.set_provider_keys(
            session, c.fernet, company.id, provider, change.api_keys or []
        )
    elif row is None:
        company_llm.set_provider_key(session, c.fernet, company.id, provider, None)
    if change.models is not None:
        company_llm.replace_models(session, company.id, provider, change.models)
        company_llm.check_fallbacks(_usable_view(session, c, company.id), change.models)
    default_model = change.default_model
    if default_model is not UNSET:
        if (
            default_model is not None
            and _usable_view(session, c, company.id).model(default_model) is None
        ):
            raise ValidationFailed("default_model", f"{default_model!r} is not a usable model")
        company.default_model = default_model
        session.flush()
    _check_token_room(session, c, company.id, change, before)


def _token_routes(
    session: Session, c: Caller, company_id: str
) -> dict[str, tuple[ModelSpec, list[UpstreamRoute | None]]]:
    """Each model of the company's view, with the routes its stream token seals (its
    own and its chain's, `fallbacks.check_token_room`)."""
    view = _usable_view(session, c, company_id)
    pools = {
        provider: tuple(keys)
        for provider, keys in company_llm.own_key_pools(
            session, c.fernet, company_id, c.catalog
        ).items()
    }

    def route(spec: ModelSpec) -> UpstreamRoute | None:
        pool = pools.get(spec.provider, ())
        return company_llm.route_for(c.catalog, spec, pool[0] if pool else None, pool)

    return {
        spec.id: (spec, [route(spec), *map(route, company_llm.chain_of(view, spec))])
        for spec in view.models.values()
    }


def _token_sizes(session: Session, c: Caller, company_id: str) -> dict[str, int]:
    """What each model's token seals before a change (`_check_token_room`)."""
    return {
        model_id: sealed_size(routes)
        for model_id, (_, routes) in _token_routes(session, c, company_id).items()
    }


def _check_token_room(
    session: Session, c: Caller, company_id: str, change: Change, before: dict[str, int]
) -> None:
    """422 when the change makes a model of the company's view, with its whole chain,
    seal more of its key pools into a stream token than fits
    (`fallbacks.check_token_room`): refused here, where an owner can fix it, not at
    each member's init. A model the catalog already grew past it (`before`: its
    size before the change) does not block a change that grows it no further: the
    rotation of a leaked key, another provider's key (init refuses that model)."""
    field = "api_keys" if change.api_keys is not UNSET else None
    for model_id, (spec, routes) in _token_routes(session, c, company_id).items():
        if sealed_size(routes) > before.get(model_id, 0):
            check_token_room(spec, routes, field or f"models.{model_id}")


def _audit(
    session: Session,
    c: Caller,
    action: str,
    company_id: str,
    provider: str,
    before: dict[str, Any],
    after: dict[str, Any] | None = None,
) -> None:
    audit.record_admin(
        session,
        actor=accounts.actor_of(c.principal),
        action=action,
        company_id=company_id,
        target=f"provider:{provider}",
        request_id=c.request_id,
        before=before,
        after=after,
    )


def configure(session: Session, c: Caller, company_id: str, change: Change) -> dict[str, Any]:
    """Store `change` and audit it (the views carry `has_key`, never a key;
    `key_changed` says one was sent). Returns the provider's view."""
    company = _company(session, c.principal, company_id, lock=True)
    before = _view(session, c, company, change.provider, with_overrides=True)
    _apply(session, c, company, change)
    after = _view(session, c, company, change.provider, with_overrides=True)
    _audit(
        session,
        c,
        audit.PROVIDER_SET,
        company_id,
        change.provider,
        before,
        {**after, "key_changed": change.api_keys is not UNSET},
    )
    return _view(session, c, company, change.provider)


def list_views(session: Session, c: Caller, company_id: str) -> list[dict[str, Any]]:
    """Every provider the company stores a key or a model for, by name."""
    company = _company(session, c.principal, company_id)
    providers = {r.provider for r in company_llm.provider_rows(session, company.id)}
    providers |= {o.provider for o in company_llm.load_overrides(session, company.id)}
    return [
        _view(session, c, company, name, with_overrides=True)
        for name in sorted(providers)
        if name in c.catalog.providers
    ]


def remove(session: Session, c: Caller, company_id: str, provider: str) -> None:
    """Forget the company's key and models for `provider`, and audit it."""
    company = _company(session, c.principal, company_id, lock=True)
    before = _view(session, c, company, provider, with_overrides=True)
    company_llm.remove_provider(session, company_id, provider)
    _audit(session, c, audit.PROVIDER_DELETE, company_id, provider, before)


async def with_key_states(
    store: KeyValueStore, company_id: str, views: list[dict[str, Any]]
) -> None:
    """Fill each view's `keys` with the state the edges recorded (one store read).
    A store that does not answer leaves the states out, not the view."""
    wanted = [
        (key, state_key(company_scope(company_id), view["provider"], key["id"]))
        for view in views
        for key in view["keys"]
    ]
    if not wanted:
        return
    try:
        raws = await store.get_many([name for _, name in wanted])
    except Exception:
        return
    now = time.time()
    for (key, _), raw in zip(wanted, raws, strict=True):
        key.update(parse_state(raw, now).public(key["id"]))
