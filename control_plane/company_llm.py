"""A company's own LLM configuration: provider keys, added or overridden models, the
default model; and the catalog the company sees (the packaged one merged with its
overrides).

Pure core: `parse_models` validates a ``models`` body with the catalog's own parse
rules (`shared.catalog.parse_catalog`), `company_catalog` merges.

Money rule: a company may change a model's price, upstream model or features, route
a packaged model to another provider, or add models, only for a provider for which
it stores its own key (`own_key_field`). On the platform's key the packaged entry
applies whatever is stored: `company_catalog` enforces it when the catalog is
resolved (a key cleared or no longer decryptable later takes the overrides with it),
`PUT …/providers` refuses to store what could not apply. Data functions take
a DB session and do not commit. Provider keys are Fernet-encrypted with
``LLMGW_ENCRYPTION_KEY`` (`MultiFernet`, newest key first) and never leave this
module in clear except inside a sealed stream-token claim (`route_for`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
from cryptography.fernet import InvalidToken, MultiFernet
from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane.errors import ValidationFailed
from control_plane.tables import CompanyModel, CompanyProvider, new_id, utcnow
from shared.catalog import (
    Catalog,
    CatalogError,
    ModelSpec,
    Provider,
    parse_catalog,
    parse_fallbacks,
)
from shared.key_pool import key_id
from shared.route_claim import UpstreamRoute

SPEC_KEYS = (
    "upstream_model",
    "context_length",
    "max_output_tokens",
    "features",
    "image_input_tokens",
    "price",
)
OVERRIDE_KEYS = (*SPEC_KEYS, "provider", "enabled", "fallbacks")
# What a company may change on the platform's key: limits and visibility, not what
# is called or what it costs. `fallbacks` names other models of the company's own
# view, each at its own (view's) price, so it changes neither (issue 16.2).
PLATFORM_KEY_FIELDS = frozenset({"context_length", "max_output_tokens", "enabled", "fallbacks"})
# Of those, the limits: on the platform's key at most the packaged model's own (its
# backend gives no more; a larger one only makes inits fail, review 3A finding 6).
LIMIT_FIELDS = ("context_length", "max_output_tokens")
MAX_MODELS = 200
MODEL_ID_MAX = 200
API_KEY_MAX = 4096


def model_raw(spec: ModelSpec) -> dict[str, Any]:
    """A model spec as the catalog file would write it."""
    return {
        "provider": spec.provider,
        "upstream_model": spec.upstream_model,
        "context_length": spec.context_length,
        "max_output_tokens": spec.max_output_tokens,
        "features": list(spec.features),
        "image_input_tokens": spec.image_input_tokens,
        "price": spec.price.raw(),
        "fallbacks": list(spec.fallbacks),
    }


def merge_model(
    base: ModelSpec | None, model_id: str, provider: str, partial: dict[str, Any]
) -> ModelSpec:
    """`partial` over `base` (or over nothing: then every field is required), routed
    to `provider`, validated exactly as a catalog entry. CatalogError names the field."""
    raw: dict[str, Any] = model_raw(base) if base is not None else {"upstream_model": model_id}
    for key in (*SPEC_KEYS, "fallbacks"):
        if key not in partial:
            continue
        if key == "price" and isinstance(partial[key], dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **partial[key]}
        else:
            raw[key] = partial[key]
    raw["provider"] = provider
    # Any api_type will do: model entries are validated independently of it.
    doc = {
        "default_model": model_id,
        "providers": {provider: {"api_type": "openai_chat", "base_url": "http://x"}},
        "models": {model_id: raw},
    }
    # Fallbacks name models of the company's whole view: checked there (`chain_of`).
    return parse_catalog(doc, check_fallbacks=False).models[model_id]


# How many merged overrides a process keeps (`merged_model`): a few KiB each; far
# above what the companies an instance serves at once have.
MERGED_MODELS = 20_000


def merged_model(
    base: ModelSpec | None, model_id: str, provider: str, partial: dict[str, Any]
) -> ModelSpec:
    """`merge_model`, remembered by what decides it (the packaged entry, the id, the
    provider and the partial spec's JSON): a company's overrides are merged for every
    init and every read of its catalog, each a catalog parse (~90 us), so an owner's
    1,000 overrides cost each of its members' inits ~90 ms on the threads whose CPU
    the event loop shares. A spec that fails to merge raises again each time."""
    try:
        text = orjson.dumps(partial, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError):  # not JSON as stored: never remembered
        return merge_model(base, model_id, provider, partial)
    return _merged(base, model_id, provider, text)


@lru_cache(maxsize=MERGED_MODELS)
def _merged(base: ModelSpec | None, model_id: str, provider: str, partial: bytes) -> ModelSpec:
    return merge_model(base, model_id, provider, orjson.loads(partial))


def parse_models(value: Any, provider: str, catalog: Catalog) -> dict[str, dict[str, Any]]:
    """The ``models`` of ``PUT …/providers/{provider}``: model id → partial spec.
    Each entry must merge into a valid model; ``provider``, when given, must be the
    path's; ``enabled: false`` hides a model from the company."""
    if not isinstance(value, dict):
        raise ValidationFailed("models", "must be an object of model id → spec")
    if len(value) > MAX_MODELS:
        raise ValidationFailed("models", f"must have at most {MAX_MODELS} entries")
    result: dict[str, dict[str, Any]] = {}
    for model_id, partial in value.items():
        where = f"models.{model_id}"
        # Printable: an id reaches the edge's log lines (`model=`) and so the
        # operator's terminal, where an ESC sequence rewrites what is shown.
        if (
            not model_id.strip()
            or len(model_id) > MODEL_ID_MAX
            or any(c.isspace() for c in model_id)
            or not model_id.isprintable()
        ):
            raise ValidationFailed(
                where, f"ids are 1-{MODEL_ID_MAX} printable characters, no spaces"
            )
        if not isinstance(partial, dict):
            raise ValidationFailed(where, "must be an object")
        unknown = sorted(set(partial) - set(OVERRIDE_KEYS))
        if unknown:
            raise ValidationFailed(
                f"{where}.{unknown[0]}", f"is not a model field ({', '.join(OVERRIDE_KEYS)})"
            )
        if partial.get("provider", provider) != provider:
            raise ValidationFailed(f"{where}.provider", f"must be {provider!r} (the path's)")
        if "enabled" in partial and not isinstance(partial["enabled"], bool):
            raise ValidationFailed(f"{where}.enabled", "must be true or false")
        try:
            merge_model(catalog.model(model_id), model_id, provider, partial)
        except CatalogError as exc:
            raise ValidationFailed(
                where, str(exc).removeprefix(f"models.{model_id}").lstrip(".") or "is invalid"
            ) from None
        result[model_id] = {k: v for k, v in partial.items() if k != "provider"}
    return result


def own_key_field(
    model_id: str, provider: str, partial: dict[str, Any], base: Catalog
) -> str | None:
    """Where an override needs the company's own key for `provider`: ``""`` for the
    model itself (added, or a packaged model moved to another provider), else its
    first field beyond `PLATFORM_KEY_FIELDS`; None when it may use the platform's key."""
    packaged = base.model(model_id)
    if packaged is None or packaged.provider != provider:
        return ""
    return next((key for key in sorted(partial) if key not in PLATFORM_KEY_FIELDS), None)


def check_platform_key(provider: str, models: dict[str, dict[str, Any]], base: Catalog) -> None:
    """422 naming the first override that the platform's key cannot carry: a field
    beyond `PLATFORM_KEY_FIELDS`, or a limit above the packaged model's."""
    for model_id, partial in models.items():
        field = own_key_field(model_id, provider, partial, base)
        if field is not None:
            where = f"models.{model_id}" + (f".{field}" if field else "")
            raise ValidationFailed(
                where,
                f"needs the company's own api_key for {provider} (on the platform's key "
                "the packaged model, price and features apply)",
            )
        packaged = base.models[model_id]  # `own_key_field` None: a packaged model
        for key in LIMIT_FIELDS:
            value, most = partial.get(key), getattr(packaged, key)
            if isinstance(value, int) and value > most:
                raise ValidationFailed(
                    f"models.{model_id}.{key}",
                    f"must be at most {most} on the platform's key (the packaged model's)",
                )


def within_packaged(partial: dict[str, Any], packaged: ModelSpec) -> dict[str, Any]:
    """`partial` with its limits cut to the packaged model's (an override stored
    before `check_platform_key` refused larger ones)."""
    return {
        key: min(value, getattr(packaged, key))
        if key in LIMIT_FIELDS and isinstance(value, int)
        else value
        for key, value in partial.items()
    }


def takes_own_key(provider: Provider) -> bool:
    """Whether a company may bring its own key for `provider`: not for an in-house
    backend that authenticates the platform by `service_token_env`, where any string
    would pass as an "own key" and unlock price and model overrides on the platform's
    own backend (review 3A, finding 1). A backend called with no key at all (the
    packaged ``mock``) takes one, as DESIGN §4 lets every company: it guards nothing
    the platform pays for with a credential, so there is nothing to ride."""
    return provider.service_token_env is None


def check_own_key(provider: Provider) -> None:
    """422 when a company may not store a key for `provider` (`takes_own_key`)."""
    if takes_own_key(provider):
        return
    raise ValidationFailed(
        "api_key",
        f"{provider.name} takes no company key: its backend is the platform's and "
        "authenticates the platform with its service token, so only the platform's key "
        "and the packaged models, prices and features apply",
    )


def own_keyed(base: Catalog, providers: Iterable[str]) -> frozenset[str]:
    """Of `providers` (those for which a company stores a key), the ones whose key
    counts: a stored key for a provider that `takes_own_key` refuses (stored before
    that rule) unlocks nothing and is never sent."""
    return frozenset(
        name
        for name in providers
        if (provider := base.providers.get(name)) is not None and takes_own_key(provider)
    )


@dataclass(frozen=True, slots=True)
class CompanyCatalog:
    """What one company may use."""

    models: dict[str, ModelSpec]
    default_model: str
    custom: frozenset[str] = frozenset()  # added or overridden by the company
    disabled: frozenset[str] = frozenset()

    def model(self, model_id: str) -> ModelSpec | None:
        return self.models.get(model_id)


def company_catalog(
    base: Catalog,
    overrides: Iterable[CompanyModel],
    default_model: str | None,
    keyed: frozenset[str] = frozenset(),
) -> CompanyCatalog:
    """The packaged catalog merged with the company's overrides. `keyed`: the
    providers for which the company has its own key (only those that take one count,
    `own_keyed`); on any other provider only `PLATFORM_KEY_FIELDS` of an override of
    a packaged model apply."""
    keyed = own_keyed(base, keyed)
    models = dict(base.models)
    custom: set[str] = set()
    disabled: set[str] = set()
    for row in overrides:
        partial = row.spec
        if row.provider not in keyed:
            if own_key_field(row.model_id, row.provider, {}, base) is not None:
                continue  # an added or moved model needs the company's key
            partial = {k: v for k, v in partial.items() if k in PLATFORM_KEY_FIELDS}
            partial = within_packaged(partial, base.models[row.model_id])
        try:
            spec = merged_model(base.model(row.model_id), row.model_id, row.provider, partial)
        except CatalogError:
            continue  # a packaged catalog change made a stored override invalid: ignore it
        if row.provider not in base.providers:
            continue
        if partial.get("enabled") is False:
            disabled.add(row.model_id)
            models.pop(row.model_id, None)
            continue
        models[row.model_id] = spec
        custom.add(row.model_id)
    if default_model not in models:
        default_model = base.default_model if base.default_model in models else None
    if default_model is None:
        default_model = next(iter(models), base.default_model)
    return CompanyCatalog(models, default_model, frozenset(custom), frozenset(disabled))


# --- data -------------------------------------------------------------------------


def load_overrides(session: Session, company_id: str) -> list[CompanyModel]:
    return list(
        session.scalars(
            select(CompanyModel)
            .where(col(CompanyModel.company_id) == company_id)
            .order_by(col(CompanyModel.model_id))
        )
    )


def provider_row(session: Session, company_id: str, provider: str) -> CompanyProvider | None:
    return session.scalars(
        select(CompanyProvider)
        .where(col(CompanyProvider.company_id) == company_id)
        .where(col(CompanyProvider.provider) == provider)
    ).first()


def provider_rows(session: Session, company_id: str) -> list[CompanyProvider]:
    return list(
        session.scalars(
            select(CompanyProvider)
            .where(col(CompanyProvider.company_id) == company_id)
            .order_by(col(CompanyProvider.provider))
        )
    )


def set_provider_key(
    session: Session, fernet: MultiFernet, company_id: str, provider: str, api_key: str | None
) -> CompanyProvider:
    return set_provider_keys(session, fernet, company_id, provider, [api_key] if api_key else [])


def set_provider_keys(
    session: Session, fernet: MultiFernet, company_id: str, provider: str, keys: list[str]
) -> CompanyProvider:
    """The company's key pool for `provider` becomes `keys` (none: the platform's)."""
    row = provider_row(session, company_id, provider)
    now = utcnow()
    encrypted = fernet.encrypt(keys[0].encode("utf-8")).decode("ascii") if keys else None
    extra = fernet.encrypt(orjson.dumps(keys[1:])).decode("ascii") if keys[1:] else None
    if row is None:
        row = CompanyProvider(
            id=new_id(),
            company_id=company_id,
            provider=provider,
            api_key_encrypted=encrypted,
            extra_keys_encrypted=extra,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
    else:
        row.api_key_encrypted = encrypted
        row.extra_keys_encrypted = extra
        row.updated_at = now
    session.flush()
    return row


def replace_models(
    session: Session, company_id: str, provider: str, models: dict[str, dict[str, Any]]
) -> None:
    """The company's models routed to `provider` become exactly `models` (an id moved
    here from another provider moves)."""
    session.execute(
        delete(CompanyModel)
        .where(col(CompanyModel.company_id) == company_id)
        .where(
            or_(
                col(CompanyModel.provider) == provider,
                col(CompanyModel.model_id).in_(list(models)),
            )
        )
    )
    now = utcnow()
    for model_id, partial in models.items():
        session.add(
            CompanyModel(
                id=new_id(),
                company_id=company_id,
                model_id=model_id,
                provider=provider,
                spec=partial,
                updated_at=now,
            )
        )
    session.flush()


def remove_provider(session: Session, company_id: str, provider: str) -> None:
    session.execute(
        delete(CompanyModel)
        .where(col(CompanyModel.company_id) == company_id)
        .where(col(CompanyModel.provider) == provider)
    )
    session.execute(
        delete(CompanyProvider)
        .where(col(CompanyProvider.company_id) == company_id)
        .where(col(CompanyProvider.provider) == provider)
    )


def keyed_providers(session: Session, company_id: str) -> frozenset[str]:
    """Providers for which the company stores a key (for views; init decrypts).
    `company_catalog` counts only those that take a company key (`own_keyed`)."""
    return frozenset(
        r.provider for r in provider_rows(session, company_id) if r.api_key_encrypted is not None
    )


def own_key_pools(
    session: Session, fernet: MultiFernet, company_id: str, base: Catalog
) -> dict[str, list[str]]:
    """provider → the company's key pool (first key first), for pools whose first key
    still decrypts, of providers that take a company key (`own_keyed`)."""
    rows = provider_rows(session, company_id)
    usable = own_keyed(base, (r.provider for r in rows))
    pools = {r.provider: decrypt_keys(fernet, r) for r in rows if r.provider in usable}
    return {provider: keys for provider, keys in pools.items() if keys}


def decrypt_keys(fernet: MultiFernet, row: CompanyProvider | None) -> list[str]:
    """The row's whole pool; the further keys are left out if they no longer decrypt."""
    first = decrypt_key(fernet, row)
    if first is None or row is None or row.extra_keys_encrypted is None:
        return [first] if first is not None else []
    try:
        extra = orjson.loads(fernet.decrypt(row.extra_keys_encrypted.encode("ascii")))
    except (InvalidToken, orjson.JSONDecodeError):
        return [first]
    return [first, *(k for k in extra if isinstance(k, str))]


def key_ids(fernet: MultiFernet, row: CompanyProvider | None) -> list[str]:
    """What admins see of a pool: each key's id (`shared.key_pool.key_id`), never a key."""
    return [key_id(k) for k in decrypt_keys(fernet, row)]


def chain_of(cat: CompanyCatalog, model: ModelSpec) -> list[ModelSpec]:
    """`model`'s fallbacks that the company may use (in its view: enabled, and on the
    platform's key at packaged terms, `company_catalog`), in order; others are
    skipped."""
    chain = []
    for model_id in model.fallbacks:
        spec = cat.model(model_id)
        if spec is not None and spec.id != model.id:
            chain.append(spec)
    return chain


def check_fallbacks(cat: CompanyCatalog, models: dict[str, dict[str, Any]]) -> None:
    """422 unless each stored `fallbacks` names models of the company's view."""
    for model_id, partial in models.items():
        if "fallbacks" not in partial:
            continue
        names = parse_fallbacks(partial["fallbacks"], model_id, "fallbacks")
        unknown = [name for name in names if cat.model(name) is None]
        if unknown:
            raise ValidationFailed(
                f"models.{model_id}.fallbacks", f"{unknown[0][:200]!r} is not a usable model"
            )


def decrypt_key(fernet: MultiFernet, row: CompanyProvider | None) -> str | None:
    if row is None or row.api_key_encrypted is None:
        return None
    try:
        return fernet.decrypt(row.api_key_encrypted.encode("ascii")).decode("utf-8")
    except InvalidToken:
        return None  # encrypted with a key no longer configured: fall back to the platform's


def route_for(
    base: Catalog, model: ModelSpec, api_key: str | None, api_keys: tuple[str, ...] = ()
) -> UpstreamRoute | None:
    """The `upr` claim's route: only when the company brings its own key for the
    model's provider; otherwise the edge uses its packaged catalog (which, on the
    platform's key, is what the company's catalog resolved to) and the platform's keys."""
    if api_key is None:
        return None
    provider = base.providers[model.provider]
    return UpstreamRoute(
        provider=provider.name,
        api_type=provider.api_type,
        base_url=provider.base_url,
        upstream_model=model.upstream_model,
        api_key=api_key,
        features=model.features,
        image_input_tokens=model.image_input_tokens,
        context_length=model.context_length,
        api_keys=api_keys if len(api_keys) > 1 else (),
    )


@dataclass
class Rotated:
    provider_keys: int = 0
    signing_keys: int = 0
    failed: list[str] = field(default_factory=list)


def rotate_provider_keys(session: Session, fernet: MultiFernet, result: Rotated) -> None:
    """Re-encrypt every stored provider key under the newest ``LLMGW_ENCRYPTION_KEY``."""
    for row in session.scalars(
        select(CompanyProvider).where(col(CompanyProvider.api_key_encrypted).is_not(None))
    ):
        assert row.api_key_encrypted is not None
        try:
            row.api_key_encrypted = fernet.rotate(row.api_key_encrypted.encode("ascii")).decode(
                "ascii"
            )
            result.provider_keys += 1
        except InvalidToken:
            result.failed.append(f"provider key {row.company_id}/{row.provider}")
            continue
        if row.extra_keys_encrypted is not None:
            try:
                row.extra_keys_encrypted = fernet.rotate(
                    row.extra_keys_encrypted.encode("ascii")
                ).decode("ascii")
            except InvalidToken:
                result.failed.append(f"provider keys {row.company_id}/{row.provider}")
    session.flush()
