"""``/v1/admin/companies/{id}/providers…``: a company's own provider keys and models;
``/v1/admin/encryption-keys/rotate``: re-encrypt stored secrets under the newest
``LLMGW_ENCRYPTION_KEY``.

A provider key is write-only: no answer ever contains it, only ``has_key`` and, for
a key pool (issue 16.1: ``"api_keys": [...]``), each key's id and state (``ok``,
``resting`` until a time, ``bad``) as the edges recorded it in the shared store.
"""

from __future__ import annotations

import time
from typing import Any

from cryptography.fernet import InvalidToken, MultiFernet
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import accounts, audit, catalog_cache, company_llm, company_webhooks, policy
from control_plane.auth import authenticate
from control_plane.deps import get_deps, read_json
from control_plane.errors import Forbidden, NotFound, ValidationFailed
from control_plane.middleware import request_id
from control_plane.policy import Principal
from control_plane.responses import no_content, ok
from control_plane.tables import Company, SigningKey
from shared.catalog import Catalog
from shared.key_pool import MAX_KEYS, company_scope, parse_state, state_key
from shared.store import KeyValueStore

_UNSET: Any = object()


def _company(session: Session, p: Principal, company_id: str) -> Company:
    company = session.get(Company, company_id)
    if company is None or not policy.can_configure_llm(p, company_id):
        raise NotFound("No such company.")
    return company


def _provider_view(
    session: Session,
    catalog: Catalog,
    company: Company,
    provider: str,
    fernet: MultiFernet,
    *,
    with_overrides: bool = False,
) -> dict[str, Any]:
    row = company_llm.provider_row(session, company.id, provider)
    overrides = company_llm.load_overrides(session, company.id)
    keyed = company_llm.keyed_providers(session, company.id)
    view = company_llm.company_catalog(catalog, overrides, company.default_model, keyed)
    mine = [o for o in overrides if o.provider == provider]
    shown: dict[str, Any] = {
        "provider": provider,
        "has_key": row is not None and row.api_key_encrypted is not None,
        "keys": [{"id": kid} for kid in company_llm.key_ids(fernet, row)],
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


def _valid_key(value: Any, where: str) -> str:
    # The key travels in an HTTP header (`Authorization`, `x-api-key`): only
    # printable ASCII can, so anything else is refused here, not by the edge later.
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= company_llm.API_KEY_MAX
        or not all("!" <= c <= "~" for c in value)
    ):
        raise ValidationFailed(
            where,
            f"must be a key of 1-{company_llm.API_KEY_MAX} printable ASCII characters, no spaces",
        )
    return value


def _api_key(doc: dict[str, Any]) -> Any:
    """The key pool to store: a list of keys, None (back to the platform's keys) or
    _UNSET (keep what is stored). `api_key` is a pool of one."""
    if "api_key" in doc and "api_keys" in doc:
        raise ValidationFailed("api_keys", "give either api_key or api_keys, not both")
    if "api_keys" in doc:
        values = doc["api_keys"]
        if values is None:
            return None
        if not isinstance(values, list) or not 0 < len(values) <= MAX_KEYS:
            raise ValidationFailed("api_keys", f"must be a list of 1-{MAX_KEYS} keys, or null")
        keys = [_valid_key(v, f"api_keys[{i}]") for i, v in enumerate(values)]
        if len(set(keys)) != len(keys):
            raise ValidationFailed("api_keys", "must not repeat a key")
        if sum(map(len, keys)) > company_llm.API_KEY_MAX:
            # The pool travels sealed inside every stream token (and again for each
            # fallback on the provider): it must keep the token URL-sized.
            raise ValidationFailed(
                "api_keys", f"must hold at most {company_llm.API_KEY_MAX} characters in all"
            )
        return keys
    if "api_key" not in doc:
        return _UNSET
    value = doc["api_key"]
    if value is None:
        return None  # remove the company's key: back to the platform's
    return [_valid_key(value, "api_key")]


def _configure(
    session: Session,
    p: Principal,
    fernet: MultiFernet,
    catalog: Catalog,
    company_id: str,
    provider: str,
    api_key: Any,
    models: dict[str, dict[str, Any]] | None,
    default_model: Any,
) -> dict[str, Any]:
    company = _company(session, p, company_id)
    row = company_llm.provider_row(session, company.id, provider)
    has_key = row is not None and row.api_key_encrypted is not None
    if not (has_key if api_key is _UNSET else api_key is not None):
        # On the platform's key: what is sent now, or else what stays stored, must be
        # something that key can carry (`company_llm.own_key_field`).
        kept = models
        if kept is None:
            overrides = company_llm.load_overrides(session, company.id)
            kept = {o.model_id: o.spec for o in overrides if o.provider == provider}
        company_llm.check_platform_key(provider, kept, catalog)
    if api_key is not _UNSET:
        company_llm.set_provider_keys(session, fernet, company.id, provider, api_key or [])
    elif row is None:
        company_llm.set_provider_key(session, fernet, company.id, provider, None)
    if models is not None:
        company_llm.replace_models(session, company.id, provider, models)
        keyed = company_llm.keyed_providers(session, company.id)
        overrides = company_llm.load_overrides(session, company.id)
        view = company_llm.company_catalog(catalog, overrides, None, keyed)
        company_llm.check_fallbacks(view, models)
    if default_model is not _UNSET:
        if default_model is not None:
            overrides = company_llm.load_overrides(session, company.id)
            keyed = company_llm.keyed_providers(session, company.id)
            view = company_llm.company_catalog(catalog, overrides, None, keyed)
            if view.model(default_model) is None:
                raise ValidationFailed("default_model", f"{default_model!r} is not a usable model")
        company.default_model = default_model
        session.flush()
    return _provider_view(session, catalog, company, provider, fernet)


def _provider(request: Request, catalog: Catalog) -> str:
    provider = str(request.path_params["provider"])
    if provider not in catalog.providers:
        raise NotFound(f"No provider named {provider[:100]!r}.")
    return provider


async def put_provider(request: Request) -> Response:
    """Store a company's own provider key, default model and models (never returns the key)."""
    principal = await authenticate(request)
    deps = get_deps(request)
    catalog = deps.settings.catalog
    company_id = str(request.path_params["company_id"])
    if not policy.can_configure_llm(principal, company_id):
        raise NotFound("No such company.")
    provider = _provider(request, catalog)
    doc = await read_json(request)
    unknown = sorted(set(doc) - {"api_key", "api_keys", "default_model", "models"})
    if unknown:
        raise ValidationFailed(
            unknown[0], "is not a field (api_key, api_keys, default_model, models)"
        )
    api_key = _api_key(doc)
    raw_models = doc.get("models")
    models = None if raw_models is None else company_llm.parse_models(raw_models, provider, catalog)
    default_model: Any = _UNSET
    if "default_model" in doc:
        default_model = doc["default_model"]
        if default_model is not None and (
            not isinstance(default_model, str) or not 0 < len(default_model) <= 200
        ):
            raise ValidationFailed("default_model", "must be a model id or null")
    fernet = deps.fernet
    rid = request_id(request)

    def run(session: Session) -> dict[str, Any]:
        company = _company(session, principal, company_id)
        before = _provider_view(session, catalog, company, provider, fernet, with_overrides=True)
        answer = _configure(
            session,
            principal,
            fernet,
            catalog,
            company_id,
            provider,
            api_key,
            models,
            default_model,
        )
        after = _provider_view(session, catalog, company, provider, fernet, with_overrides=True)
        audit.record_admin(
            session,
            actor=accounts.actor_of(principal),
            action=audit.PROVIDER_SET,
            company_id=company_id,
            target=f"provider:{provider}",
            request_id=rid,
            # The views carry `has_key`, never the key; `key_changed` says it was sent.
            before=before,
            after={**after, "key_changed": api_key is not _UNSET},
        )
        return answer

    try:
        data = await deps.db.transaction(run)
    finally:  # committed or not: inits reload the company's configuration
        await catalog_cache.invalidate(deps.store, company_id)
    await with_key_states(deps.store, company_id, [data])
    return ok(data)


def _list(
    session: Session, p: Principal, catalog: Catalog, company_id: str, fernet: MultiFernet
) -> dict[str, Any]:
    company = _company(session, p, company_id)
    providers = {r.provider for r in company_llm.provider_rows(session, company.id)}
    providers |= {o.provider for o in company_llm.load_overrides(session, company.id)}
    return {
        "items": [
            _provider_view(session, catalog, company, name, fernet, with_overrides=True)
            for name in sorted(providers)
            if name in catalog.providers
        ]
    }


async def list_providers(request: Request) -> Response:
    """A company's provider configuration (has_key, models), keys never included."""
    principal = await authenticate(request)
    deps = get_deps(request)
    company_id = str(request.path_params["company_id"])
    catalog = deps.settings.catalog
    fernet = deps.fernet
    data = await deps.db.transaction(lambda s: _list(s, principal, catalog, company_id, fernet))
    await with_key_states(deps.store, company_id, data["items"])
    return ok(data)


async def delete_provider(request: Request) -> Response:
    """Forget a company's key and models for one provider."""
    principal = await authenticate(request)
    deps = get_deps(request)
    company_id = str(request.path_params["company_id"])
    provider = _provider(request, deps.settings.catalog)

    rid = request_id(request)
    catalog = deps.settings.catalog
    fernet = deps.fernet

    def run(session: Session) -> None:
        company = _company(session, principal, company_id)
        before = _provider_view(session, catalog, company, provider, fernet, with_overrides=True)
        company_llm.remove_provider(session, company_id, provider)
        audit.record_admin(
            session,
            actor=accounts.actor_of(principal),
            action=audit.PROVIDER_DELETE,
            company_id=company_id,
            target=f"provider:{provider}",
            request_id=rid,
            before=before,
        )

    try:
        await deps.db.transaction(run)
    finally:
        await catalog_cache.invalidate(deps.store, company_id)
    return no_content()


def reencrypt_all(session: Session, fernet: MultiFernet) -> company_llm.Rotated:
    """Re-encrypt provider keys, companies' webhook secrets and signing keys under the
    newest Fernet key, so the older ones can be removed from ``LLMGW_ENCRYPTION_KEY``."""
    result = company_llm.Rotated()
    company_llm.rotate_provider_keys(session, fernet, result)
    _, failed = company_webhooks.rotate_secrets(session, fernet)  # companies' webhook secrets
    result.failed.extend(failed)
    for row in session.scalars(select(SigningKey)):
        try:
            row.private_key_encrypted = fernet.rotate(
                row.private_key_encrypted.encode("ascii")
            ).decode("ascii")
            result.signing_keys += 1
        except InvalidToken:
            result.failed.append(f"signing key {row.kid}")
    session.flush()
    return result


async def rotate_encryption(request: Request) -> Response:
    """Re-encrypt stored provider keys and signing keys under the newest encryption key."""
    principal = await authenticate(request)
    if not policy.can_rotate_encryption(principal):
        raise Forbidden("Only a platform admin can re-encrypt stored secrets.")
    deps = get_deps(request)
    fernet = deps.fernet
    rid = request_id(request)

    def run(session: Session) -> dict[str, Any]:
        result = reencrypt_all(session, fernet)
        counts = {
            "provider_keys": result.provider_keys,
            "signing_keys": result.signing_keys,
            "failed": result.failed,
        }
        audit.record_admin(
            session,
            actor=accounts.actor_of(principal),
            action=audit.ENCRYPTION_ROTATE,
            company_id=None,
            target="encryption_keys",
            request_id=rid,
            after=counts,
        )
        return counts

    return ok(await deps.db.transaction(run), 201)


routes: list[BaseRoute] = [
    Route("/v1/admin/companies/{company_id}/providers", list_providers, methods=["GET"]),
    Route("/v1/admin/companies/{company_id}/providers/{provider}", put_provider, methods=["PUT"]),
    Route(
        "/v1/admin/companies/{company_id}/providers/{provider}",
        delete_provider,
        methods=["DELETE"],
    ),
    Route("/v1/admin/encryption-keys/rotate", rotate_encryption, methods=["POST"]),
]
