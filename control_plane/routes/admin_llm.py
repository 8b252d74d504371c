"""``/v1/admin/companies/{id}/providers…``: a company's own provider keys and models;
``/v1/admin/encryption-keys/rotate``: re-encrypt stored secrets under the newest
``LLMGW_ENCRYPTION_KEY``.

A provider key is write-only: no answer ever contains it, only ``has_key``.
"""

from __future__ import annotations

from typing import Any

from cryptography.fernet import InvalidToken, MultiFernet
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import catalog_cache, company_llm, company_webhooks, policy
from control_plane.auth import authenticate
from control_plane.deps import get_deps, read_json
from control_plane.errors import Forbidden, NotFound, ValidationFailed
from control_plane.policy import Principal
from control_plane.responses import no_content, ok
from control_plane.tables import Company, SigningKey
from shared.catalog import Catalog

_UNSET: Any = object()


def _company(session: Session, p: Principal, company_id: str) -> Company:
    company = session.get(Company, company_id)
    if company is None or not policy.can_configure_llm(p, company_id):
        raise NotFound("No such company.")
    return company


def _provider_view(
    session: Session, catalog: Catalog, company: Company, provider: str
) -> dict[str, Any]:
    row = company_llm.provider_row(session, company.id, provider)
    overrides = company_llm.load_overrides(session, company.id)
    keyed = company_llm.keyed_providers(session, company.id)
    view = company_llm.company_catalog(catalog, overrides, company.default_model, keyed)
    mine = [o for o in overrides if o.provider == provider]
    return {
        "provider": provider,
        "has_key": row is not None and row.api_key_encrypted is not None,
        "default_model": view.default_model,
        "models": [
            {**spec.public(), "enabled": True}
            if (spec := view.model(o.model_id)) is not None
            else {"id": o.model_id, "provider": provider, "enabled": False}
            for o in mine
        ],
    }


def _api_key(doc: dict[str, Any]) -> Any:
    if "api_key" not in doc:
        return _UNSET
    value = doc["api_key"]
    if value is None:
        return None  # remove the company's key: back to the platform's
    # The key travels in an HTTP header (`Authorization`, `x-api-key`): only
    # printable ASCII can, so anything else is refused here, not by the edge later.
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= company_llm.API_KEY_MAX
        or not all("!" <= c <= "~" for c in value)
    ):
        raise ValidationFailed(
            "api_key",
            f"must be a key of 1-{company_llm.API_KEY_MAX} printable ASCII characters, no spaces",
        )
    return value


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
        company_llm.set_provider_key(session, fernet, company.id, provider, api_key)
    elif row is None:
        company_llm.set_provider_key(session, fernet, company.id, provider, None)
    if models is not None:
        company_llm.replace_models(session, company.id, provider, models)
    if default_model is not _UNSET:
        if default_model is not None:
            overrides = company_llm.load_overrides(session, company.id)
            keyed = company_llm.keyed_providers(session, company.id)
            view = company_llm.company_catalog(catalog, overrides, None, keyed)
            if view.model(default_model) is None:
                raise ValidationFailed("default_model", f"{default_model!r} is not a usable model")
        company.default_model = default_model
        session.flush()
    return _provider_view(session, catalog, company, provider)


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
    unknown = sorted(set(doc) - {"api_key", "default_model", "models"})
    if unknown:
        raise ValidationFailed(unknown[0], "is not a field (api_key, default_model, models)")
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
    try:
        data = await deps.db.transaction(
            lambda s: _configure(
                s, principal, fernet, catalog, company_id, provider, api_key, models, default_model
            )
        )
    finally:  # committed or not: inits reload the company's configuration
        await catalog_cache.invalidate(deps.store, company_id)
    return ok(data)


def _list(session: Session, p: Principal, catalog: Catalog, company_id: str) -> dict[str, Any]:
    company = _company(session, p, company_id)
    providers = {r.provider for r in company_llm.provider_rows(session, company.id)}
    providers |= {o.provider for o in company_llm.load_overrides(session, company.id)}
    return {
        "items": [
            _provider_view(session, catalog, company, name)
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
    return ok(await deps.db.transaction(lambda s: _list(s, principal, catalog, company_id)))


async def delete_provider(request: Request) -> Response:
    """Forget a company's key and models for one provider."""
    principal = await authenticate(request)
    deps = get_deps(request)
    company_id = str(request.path_params["company_id"])
    provider = _provider(request, deps.settings.catalog)

    def run(session: Session) -> None:
        _company(session, principal, company_id)
        company_llm.remove_provider(session, company_id, provider)

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
    result = await deps.db.transaction(lambda s: reencrypt_all(s, fernet))
    return ok(
        {
            "provider_keys": result.provider_keys,
            "signing_keys": result.signing_keys,
            "failed": result.failed,
        },
        201,
    )


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
