"""A company's LLM configuration (its model overrides and its own provider keys,
decrypted) kept in memory between inits (issue 14.3), so init's hot path reads
neither table nor decrypts a key on every request.

Freshness across control-plane processes: every change to a company's providers or
models (``PUT``/``DELETE /v1/admin/companies/{id}/providers/{provider}``) writes a
new random version into the store (`invalidate`), after its transaction commits.
Init reads the version (with the rest of its store work: `init_gate`) BEFORE its
transaction, and uses a cached entry only when it was loaded under that same
version; otherwise it loads from the database and caches the result under the
version it read. An entry therefore never
holds data older than its version, and a change is seen by the next init of every
process. Entries also expire after `MAX_AGE_SECONDS`, which bounds what a change
that bypassed the API (SQL by hand, ``llm-gateway rotate`` re-encrypting keys to
the same plaintext) can leave behind. With the store unavailable nothing is cached
(init fails on the store anyway).
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from control_plane import company_llm
from control_plane.company_llm import CompanyCatalog
from control_plane.tables import CompanyModel
from shared.catalog import Catalog
from shared.store import KeyValueStore

log = logging.getLogger("control_plane.catalog_cache")

MAX_AGE_SECONDS = 30.0
MAX_ENTRIES = 10_000
VERSION_TTL_SECONDS = 7 * 24 * 3600
ABSENT = "-"  # the version of a company whose configuration never changed via the API


def version_key(company_id: str) -> str:
    return f"llm:config:version:{company_id}"


def detached(row: CompanyModel) -> CompanyModel:
    """A copy that belongs to no session: a session's rollback expires the rows it
    loaded, and an expired row outside its session cannot be read again."""
    return CompanyModel(
        id=row.id,
        company_id=row.company_id,
        model_id=row.model_id,
        provider=row.provider,
        spec=copy.deepcopy(row.spec),
        updated_at=row.updated_at,
    )


@dataclass(frozen=True, slots=True)
class CompanyLLM:
    overrides: tuple[CompanyModel, ...]  # `detached` copies, read only
    pools: dict[str, list[str]]  # provider → the company's key pool, decrypted
    # The company's catalogs merged from these overrides (`catalog`), by what else
    # decides them: an entry lives as long as its overrides are current.
    _views: dict[tuple[int, str | None, frozenset[str]], tuple[Catalog, CompanyCatalog]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def catalog(
        self, base: Catalog, default_model: str | None, keyed: frozenset[str]
    ) -> CompanyCatalog:
        """`company_llm.company_catalog` of these overrides, merged once per entry:
        init's hot path merged every override again for each init (~20 us each even
        with `company_llm.merged_model`, an owner's 1,000 overrides ~20 ms an init)."""
        key = (id(base), default_model, keyed)
        found = self._views.get(key)
        if found is None or found[0] is not base:
            view = company_llm.company_catalog(base, self.overrides, default_model, keyed)
            found = self._views[key] = (base, view)
        return found[1]


@dataclass(slots=True)
class _Entry:
    version: str
    loaded_at: float
    value: CompanyLLM


class CatalogCache:
    """One per app (on `Deps`). `get`/`put` are called from the database threads:
    single dict operations, atomic under the GIL."""

    def __init__(
        self,
        *,
        max_age: float = MAX_AGE_SECONDS,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: dict[str, _Entry] = {}
        self._max_age = max_age
        self._max_entries = max_entries
        self._clock = clock

    def get(self, company_id: str, version: str) -> CompanyLLM | None:
        entry = self._entries.get(company_id)
        if entry is None or entry.version != version:
            return None
        if self._clock() - entry.loaded_at > self._max_age:
            return None
        return entry.value

    def put(self, company_id: str, version: str, value: CompanyLLM) -> None:
        if len(self._entries) >= self._max_entries:
            self._entries.clear()  # crude, and rare: many companies within MAX_AGE
        self._entries[company_id] = _Entry(version, self._clock(), value)


@dataclass(frozen=True, slots=True)
class Lookup:
    """What one init carries into its transaction: the cache and the version read."""

    cache: CatalogCache
    version: str

    def get(self, company_id: str) -> CompanyLLM | None:
        return self.cache.get(company_id, self.version)

    def put(self, company_id: str, value: CompanyLLM) -> None:
        self.cache.put(company_id, self.version, value)


def lookup_of(cache: CatalogCache | None, raw_version: bytes | None) -> Lookup | None:
    """What init carries into its transaction, for the version `init_gate` read from
    the store before it (None: the company's configuration never changed via the
    API)."""
    if cache is None:
        return None
    return Lookup(cache, ABSENT if raw_version is None else raw_version.decode("ascii", "replace"))


async def invalidate(store: KeyValueStore, company_id: str) -> None:
    """After a change to the company's providers or models has committed: every
    process's cached entry for it stops matching. Best effort: if the store fails,
    entries still expire after `MAX_AGE_SECONDS`."""
    try:
        await store.set(version_key(company_id), uuid.uuid4().hex.encode(), VERSION_TTL_SECONDS)
    except Exception:
        log.warning("could not invalidate company %s's LLM config", company_id, exc_info=True)
