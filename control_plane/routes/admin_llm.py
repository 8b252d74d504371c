"""``/v1/admin/companies/{id}/providers…``: a company's own provider keys and models;
``/v1/admin/encryption-keys/rotate``: re-encrypt stored secrets under the newest
``LLMGW_ENCRYPTION_KEY``.

A provider key is write-only: no answer ever contains it, only ``has_key`` and, for
a key pool (issue 16.1: ``"api_keys": [...]``), each key's id and state (``ok``,
``resting`` until a time, ``bad``) as the edges recorded it in the shared store.
The use cases are `provider_admin`'s and `reencryption`'s; these handlers parse
and answer.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import accounts, catalog_cache, company_llm, policy, provider_admin, reencryption
from control_plane.auth import authenticate, caller_and_json
from control_plane.deps import Deps, get_deps, path_id
from control_plane.errors import Forbidden, NotFound, ValidationFailed
from control_plane.middleware import request_id
from control_plane.pagination import key_page, key_page_request
from control_plane.policy import Principal
from control_plane.provider_admin import UNSET
from control_plane.responses import no_content, ok
from shared.catalog import Catalog
from shared.key_pool import MAX_KEYS


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
    UNSET (keep what is stored). `api_key` is a pool of one."""
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
        return UNSET
    value = doc["api_key"]
    if value is None:
        return None  # remove the company's key: back to the platform's
    return [_valid_key(value, "api_key")]


def _provider(request: Request, catalog: Catalog) -> str:
    provider = str(request.path_params["provider"])
    if provider not in catalog.providers:
        raise NotFound(f"No provider named {provider[:100]!r}.")
    return provider


def _caller(request: Request, deps: Deps, principal: Principal) -> provider_admin.Caller:
    return provider_admin.Caller(principal, request_id(request), deps.settings.catalog, deps.fernet)


def _change(doc: dict[str, Any], provider: str, catalog: Catalog) -> provider_admin.Change:
    unknown = sorted(set(doc) - {"api_key", "api_keys", "default_model", "models"})
    if unknown:
        raise ValidationFailed(
            unknown[0], "is not a field (api_key, api_keys, default_model, models)"
        )
    api_keys = _api_key(doc)
    raw_models = doc.get("models")
    models = None if raw_models is None else company_llm.parse_models(raw_models, provider, catalog)
    default_model: Any = UNSET
    if "default_model" in doc:
        default_model = doc["default_model"]
        if default_model is not None and (
            not isinstance(default_model, str) or not 0 < len(default_model) <= 200
        ):
            raise ValidationFailed("default_model", "must be a model id or null")
    return provider_admin.Change(provider, api_keys, models, default_model)


async def put_provider(request: Request) -> Response:
    """Store a company's own provider key, default model and models (never returns the key)."""
    principal, doc = await caller_and_json(request)
    deps = get_deps(request)
    catalog = deps.settings.catalog
    company_id = path_id(request, "company_id")
    if not policy.can_configure_llm(principal, company_id):
        raise NotFound("No such company.")
    provider = _provider(request, catalog)
    change = _change(doc, provider, catalog)
    caller = _caller(request, deps, principal)
    data = await deps.db.transaction(
        lambda s: provider_admin.configure(s, caller, company_id, change)
    )
    # Only once the change committed, so only for a caller allowed to make it: a
    # refused request must not write a week-long version key for whatever id its
    # path names. A commit whose outcome is unknown (the transaction raised) leaves
    # cached entries to expire within `catalog_cache.MAX_AGE_SECONDS`.
    await catalog_cache.invalidate(deps.store, company_id)
    await provider_admin.with_key_states(deps.store, company_id, [data])
    return ok(data)


def _provider_of(view: dict[str, Any]) -> str:
    return str(view["provider"])


async def list_providers(request: Request) -> Response:
    """A company's provider configuration (has_key, models), keys never included."""
    principal = await authenticate(request)
    deps = get_deps(request)
    company_id = path_id(request, "company_id")
    caller = _caller(request, deps, principal)
    req = key_page_request(request.query_params)
    views = await deps.db.transaction(lambda s: provider_admin.list_views(s, caller, company_id))
    page = key_page(views, _provider_of, req)
    await provider_admin.with_key_states(deps.store, company_id, page.items)
    return ok(page.public(dict))


async def delete_provider(request: Request) -> Response:
    """Forget a company's key and models for one provider."""
    principal = await authenticate(request)
    deps = get_deps(request)
    company_id = path_id(request, "company_id")
    provider = _provider(request, deps.settings.catalog)
    caller = _caller(request, deps, principal)
    await deps.db.transaction(lambda s: provider_admin.remove(s, caller, company_id, provider))
    await catalog_cache.invalidate(deps.store, company_id)  # after the commit: see put_provider
    return no_content()


async def rotate_encryption(request: Request) -> Response:
    """Re-encrypt stored provider keys and signing keys under the newest encryption key."""
    principal = await authenticate(request)
    if not policy.can_rotate_encryption(principal):
        raise Forbidden("Only a platform admin can re-encrypt stored secrets.")
    deps = get_deps(request)
    fernet = deps.fernet
    actor, rid = accounts.actor_of(principal), request_id(request)
    counts = await deps.db.transaction(
        lambda s: reencryption.rotate_and_audit(s, fernet, actor=actor, request_id=rid)
    )
    return ok(counts, 201)


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
