"""``POST /v1/chat/init``: validate, hold credits, stash the request, mint the token.

The pure part (`chat_request.parse_init_request`, `resolve_model`, `plan_hold`) decides
everything that can be decided from the body and the catalog; `init_chat` is the
shell: one transaction that reserves the hold and records the session, then the
stash in the store and the signed stream token (DESIGN §5).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

from cryptography.fernet import MultiFernet
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import (
    abandoned_holds,
    agents,
    budgets,
    catalog_cache,
    chat_sessions,
    company_llm,
    hot_statements,
    init_gate,
    init_writes,
    pending_inits,
    raw_pg,
    time_ids,
    tpm,
)
from control_plane.background import in_background
from control_plane.chat_request import AGENT_FIXED_ROLES, InitRequest
from control_plane.db import Unit, lost_backend, outcome_unknown
from control_plane.deps import Deps
from control_plane.errors import (
    Forbidden,
    InputTooLarge,
    InsufficientCredits,
    ModelNotAllowed,
    ModelNotFound,
    RequestTooLarge,
    Revoked,
    SessionFull,
    SessionNotFound,
    StoreUnavailable,
    TurnInProgress,
    UnsupportedContent,
    UnsupportedFeature,
    ValidationFailed,
)
from control_plane.fallbacks import ChainEntry, check_token_room
from control_plane.init_writes import NewReservation
from control_plane.ledger import take_hold
from control_plane.policy import Principal, can_chat, can_use_session
from control_plane.settings import ControlPlaneSettings
from control_plane.tables import ChatSession, Reservation, new_id
from shared.catalog import MAX_TOKEN_COUNT, Catalog, ModelSpec
from shared.input_size import (
    InputRejected,
    InputSize,
    carries_files,
    content_text,
    measure_input,
    missing_features,
    params_tokens,
)
from shared.pricing import estimate_input_tokens, format_credits, hold_cost_micro
from shared.revocations import api_key_parent
from shared.route_claim import CLAIM as ROUTE_CLAIM
from shared.route_claim import UpstreamRoute, seal
from shared.stash import StashedRequest, stash_key
from shared.tokens import (
    AGENT_CLAIM,
    ALL_SCOPES,
    FALLBACKS_CLAIM,
    PARENT_CLAIM,
    FallbackGrant,
    sign_token,
    stream_claims,
)
from shared.tool_shapes import check_results_follow_calls, paired, uses_tools, without_tool_calls

log = logging.getLogger("control_plane.chat_init")

STASH_EXTRA_TTL_SECONDS = 600  # outlive the token; its first use deletes it (`Store.admit`)
MIN_OUTPUT_TOKENS = 256  # what trimming a session's history leaves room for, at least


class ModelSource(Protocol):
    """The packaged `Catalog` or a company's merged `CompanyCatalog`."""

    @property
    def default_model(self) -> str: ...

    def model(self, model_id: str) -> ModelSpec | None: ...


def resolve_model(
    catalog: ModelSource, requested: str | None, company_default: str | None
) -> ModelSpec:
    """The requested model, else the company's default, else the catalog's."""
    if requested is not None:
        model = catalog.model(requested)
        if model is None:
            raise ModelNotFound(f"No model named {requested!r}.")
        return model
    if company_default is not None and (model := catalog.model(company_default)) is not None:
        return model
    default = catalog.model(catalog.default_model)
    assert default is not None  # the catalog parser guarantees it
    return default


def check_features(model: ModelSpec, wanted: tuple[str, ...]) -> None:
    missing = [f for f in wanted if f not in model.features]
    if missing:
        raise UnsupportedFeature(
            f"{model.id} does not support {', '.join(missing)} "
            f"(it supports {', '.join(model.features) or 'nothing extra'})."
        )


def fit_history(
    model: ModelSpec,
    history: list[dict[str, Any]],
    new_turn: list[dict[str, Any]],
    max_tokens: int | None,
    params: dict[str, Any] | None = None,
    api_type: str = "openai_chat",
) -> list[dict[str, Any]]:
    """A stored session's history plus the new turn, dropping the oldest non-system
    history messages until the input leaves room for the output (`max_tokens`, or at
    least `MIN_OUTPUT_TOKENS`) in the model's context. The new turn is never dropped:
    if it alone does not fit, `plan_hold` answers 413."""
    output = (
        max_tokens if max_tokens is not None else min(model.max_output_tokens, MIN_OUTPUT_TOKENS)
    )
    # What goes upstream beside the messages (tools, stop…) takes its room first.
    rates = model.input_rates(api_type)
    room = model.context_length - output - params_tokens(params or {}, rates)
    # The estimate is a sum over messages, so dropping one subtracts its share:
    # one pass, however long the session.
    total = estimate_input_tokens(history, rates) + estimate_input_tokens(new_turn, rates)
    kept: list[dict[str, Any]] = []
    dropped = False
    dropped_calls: set[str] = set()
    for message in history:
        if message["role"] != "system" and (
            total > room
            # don't open the kept history with an answer whose question was dropped
            or (dropped and message["role"] in ("assistant", "tool") and not _has_turns(kept))
            # nor keep a tool result whose call was dropped: no vendor takes it
            or message.get("tool_call_id") in dropped_calls
        ):
            total -= estimate_input_tokens([message], rates)
            dropped = True
            dropped_calls |= {c["id"] for c in message.get("tool_calls") or []}
            continue
        kept.append(message)
    return kept + new_turn


def _has_turns(messages: list[dict[str, Any]]) -> bool:
    return any(m["role"] != "system" for m in messages)


@dataclass(frozen=True, slots=True)
class HoldPlan:
    max_tokens: int
    input_estimate: int
    hold_micro: int


def plan_hold(
    model: ModelSpec,
    messages: list[dict[str, Any]],
    max_tokens: int | None,
    params: dict[str, Any] | None = None,
    api_type: str = "openai_chat",
    *,
    billed_context: int | None = None,
    size: InputSize | None = None,
) -> HoldPlan:
    """The worst case: the input estimate plus `max_tokens` output, at the model's price.

    The estimate covers every byte that goes upstream: the messages with their
    content parts, and `params` (tools, stop…), by `shared.input_size`'s formula, the
    one the edge applies too, at the rates of the model on its provider's `api_type`
    (Anthropic's image and tool-prompt overheads). Without an explicit `max_tokens`
    the output budget is the model's maximum, cut down to what the context leaves
    after the input (the input is fitted, not refused, as long as some room for an
    answer remains). A request carrying a file is held at the whole context left
    after the output: vendors bill a PDF per page, which no cheap scan bounds, and
    never bill more input than that (`input_size.carries_files`). That context is
    the backend's, `billed_context` (`billed_context_of`), when it differs from the
    company's view of the model.

    `size`: `measure_input(messages, params)`, when the caller measured it already
    (once for the whole fallback chain: each model only prices it)."""
    if size is None:
        size = measure_input(messages, params)
    estimate = size.at(model.input_rates(api_type))
    if max_tokens is None:
        # Capped by what the reservation's `max_tokens` column holds too, whatever
        # limits the model was given (a 500 on every init otherwise).
        room = min(model.max_output_tokens, model.context_length - estimate, MAX_TOKEN_COUNT)
        max_tokens = max(1, room)
    elif max_tokens > model.max_output_tokens:
        raise ValidationFailed(
            "max_tokens", f"must be at most {model.max_output_tokens} for {model.id}"
        )
    if estimate + max_tokens > model.context_length:
        raise InputTooLarge(
            f"The input (about {estimate} tokens) plus max_tokens ({max_tokens}) exceeds "
            f"{model.id}'s context of {model.context_length} tokens."
        )
    if carries_files(messages):
        estimate = (billed_context or model.context_length) - max_tokens
    # Every input token at the dearest input rate: the hold covers any cache split.
    return HoldPlan(max_tokens, estimate, hold_cost_micro(estimate, max_tokens, model.price))


def billed_context_of(catalog: Catalog, model: ModelSpec, own_key: bool) -> int:
    """The context up to which the backend may bill a file's pages. On the platform's
    key an owner may lower a packaged model's `context_length` (a limit,
    `company_llm.PLATFORM_KEY_FIELDS`), but the vendor never sees that override and
    bills the pages up to its own context: the packaged one. On the company's own key
    its own view stands (its vendor bills the company)."""
    packaged = catalog.model(model.id)
    if own_key or packaged is None or packaged.provider != model.provider:
        return model.context_length
    return max(model.context_length, packaged.context_length)


def _rate(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def check_content(model: ModelSpec, needed: frozenset[str]) -> None:
    missing = missing_features(needed, model.features)
    if missing:
        raise UnsupportedContent(
            f"{model.id} cannot take {', '.join(missing)} content "
            f"(it supports {', '.join(model.features) or 'text only'})."
        )


def storable(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the session keeps them: content parts as text with placeholders,
    an assistant's tool calls and a tool result's call id as they are."""
    return [
        {
            "role": m["role"],
            "content": content_text(m["content"]),
            **{k: m[k] for k in ("tool_calls", "tool_call_id") if k in m},
        }
        for m in messages
    ]


def new_turn_of(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a client-owned history adds to an existing session: its last user
    message, or the tool results after the last assistant message."""
    if messages[-1]["role"] == "user":
        return messages[-1:]
    results: list[dict[str, Any]] = []
    for message in reversed(messages):
        if message["role"] != "tool":
            break
        results.insert(0, message)
    return results


_COMPANY_FOR_INIT = raw_pg.RawStatement(hot_statements.SELECT_COMPANY_FOR_INIT_WITH_BUDGETS)


@dataclass(frozen=True, slots=True)
class Reserved:
    reservation: NewReservation
    messages: list[dict[str, Any]]
    stash: bytes  # the request for the edge, serialised (`StashedRequest`)
    route: UpstreamRoute | None = None
    chain: tuple[ChainEntry, ...] = ()  # the model's usable fallbacks, in order


@dataclass(frozen=True, slots=True)
class StorageLimits:
    """What one init may store (issue 12.6): its session's caps, and the size of its
    stashed request (``LLMGW_MAX_REQUEST_BYTES``)."""

    session: chat_sessions.SessionLimits = field(default_factory=chat_sessions.SessionLimits)
    max_request_bytes: int = 2 * 1024 * 1024

    @classmethod
    def of(cls, settings: ControlPlaneSettings) -> StorageLimits:
        return cls(
            chat_sessions.SessionLimits(settings.max_session_messages, settings.max_session_bytes),
            settings.max_request_bytes,
        )


def reserve(
    session: Session | Unit,
    catalog: Catalog,
    principal: Principal,
    req: InitRequest,
    *,
    jti: str,
    request_id: str,
    now: datetime,
    hold_expires_at: datetime,
    fernet: MultiFernet | None = None,
    limits: StorageLimits | None = None,
    llm_cache: catalog_cache.Lookup | None = None,
    reservation_id: str | None = None,
    on_write: Callable[[], None] | None = None,
) -> Reserved:
    """Init's transaction: resolve the model (in the company's catalog) and session,
    plan the hold, take it atomically, record the reservation and the user's turn.
    InsufficientCredits (402), a full session or a too large request (413) roll all
    of it back. `reservation_id`: init's, which carries its tokens' instant
    (`time_ids`); a new random one by default. `on_write`: called just before the
    hold's write is sent, from when a lost connection leaves its outcome unknown
    (`abandoned_holds.release_unacknowledged`)."""
    limits = limits or StorageLimits()
    assert principal.user_id is not None and principal.company_id is not None
    # The common init (a cached company config, no agent, no session id, no budgets)
    # never asks the unit for its ORM session (`db.Unit`).
    unit = session if isinstance(session, Unit) else Unit.of(session)
    company = unit.read(lambda on: _COMPANY_FOR_INIT.first_on(on, {"p_id": principal.company_id}))
    if company is None:
        raise Forbidden("Your company no longer exists.")
    if company.disabled_at is not None:
        raise Revoked("Your company has been revoked.")
    # The company's own keys decide which of its overrides apply (`company_llm`):
    # a key that no longer decrypts routes to the platform's key, at packaged terms.
    llm = _company_llm(unit, catalog, fernet, company.id, llm_cache)
    pools = llm.pools
    keys = {provider: pool[0] for provider, pool in pools.items()}
    cat = llm.catalog(catalog, company.default_model, frozenset(keys))
    req, prefix = _with_agent(unit, cat, company.id, req)
    if req.model is not None and req.model in cat.disabled:
        raise ModelNotAllowed(f"Your company cannot use {req.model!r}.")
    model = resolve_model(cat, req.model, company.default_model)
    check_features(model, req.features)
    check_content(model, req.content_features)
    chat: ChatSession | None = None
    if req.session_id is not None:
        chat = unit.session().get(ChatSession, req.session_id)
        if chat is None or not can_use_session(principal, chat.user_id, chat.company_id):
            raise SessionNotFound()
    if req.query is not None or req.tool_results is not None:
        new_turn = req.tool_results or [{"role": "user", "content": req.query}]
        past = chat_sessions.history(unit.session(), chat.id) if chat else []
        if req.agent is not None:
            # The agent's prompt is the only instruction of its turns: a system message
            # the session kept from a turn without the agent would override it, as the
            # body may not (`chat_request._agent`).
            past = [m for m in past if m.get("role") not in AGENT_FIXED_ROLES]
        if req.tool_results is not None:
            # each result must answer a call of the session's last assistant message
            _check_results(unit.session(), chat, past, new_turn, "tool_results")
        # Sent paired (the transcript keeps all): a call the member never answered,
        # or a result apart from its call, would have every vendor refuse this turn
        # and each later one of the session.
        history = [
            m
            for m in paired([*prefix, *past, *new_turn])[: -len(new_turn)]
            # An empty message a client-owned history stored carries nothing, and
            # Anthropic refuses every request holding one ("all messages must have
            # non-empty content"): sent, it broke each later turn of the session.
            if m["content"] or m.get("tool_calls") or m["role"] == "tool"
        ]
        if "tools" not in model.features:
            # A model without tools gets the session's text only (docs/tool-calls.md:
            # a model must list `tools` to get tool messages). Refusing the turn would
            # strand every session that ever used tools on this model; sending them
            # anyway, vendors refuse (Anthropic: tool blocks without `tools`). Cut
            # here, before the fit and the hold: the hold counts what is sent.
            history = without_tool_calls(history)
        messages = fit_history(
            model, history, new_turn, req.max_tokens, req.params, _api_type(catalog, model)
        )
        if req.tool_results is not None:
            # trimming the history to fit may not have kept their calls
            _check_results(
                unit.session(), chat, messages[: -len(new_turn)], new_turn, "tool_results"
            )
            new_turn = storable(new_turn)
    else:
        assert req.messages is not None
        # The client owns the history; an existing session records only the new turn.
        new_turn = storable(req.messages if chat is None else new_turn_of(req.messages))
        if chat is not None and any(m["role"] == "tool" for m in new_turn):
            # Tool results the session will keep must answer calls ITS assistant made,
            # not calls the client's own copy of the history claims: else a forged
            # call stores an orphan `tool` message that every later turn of the
            # session sends upstream (which vendors refuse), or a "tool" answer the
            # session's model never asked for.
            past = chat_sessions.history(unit.session(), chat.id)
            _check_results(
                unit.session(),
                chat,
                past,
                new_turn,
                "messages",
                "a tool message must answer a tool call this session's assistant made",
            )
        messages = [*prefix, *req.messages]
    # Measured once: the chain's models only price it (`InputSize.at`).
    size = measure_input(messages, req.params)
    plan = plan_hold(
        model,
        messages,
        req.max_tokens,
        req.params,
        _api_type(catalog, model),
        billed_context=billed_context_of(catalog, model, own_key=model.provider in keys),
        size=size,
    )
    chain = plan_chain(catalog, cat, model, req, messages, plan.max_tokens, pools, size)
    pool = tuple(pools.get(model.provider, ()))
    route = company_llm.route_for(catalog, model, keys.get(model.provider), pool)
    check_token_room(model, [route, *(entry.route for entry in chain)])
    stash = StashedRequest(messages=messages, params=req.params).dumps()
    if len(stash) > limits.max_request_bytes:
        raise RequestTooLarge(
            f"The request with its history is {len(stash)} bytes; at most "
            f"{limits.max_request_bytes} are stored for a stream."
        )
    session_id = chat.id if chat is not None else new_id()
    reservation = NewReservation(
        id=reservation_id or new_id(),
        company_id=company.id,
        user_id=principal.user_id,
        jti=jti,
        session_id=session_id,
        request_id=request_id,
        model=model.id,
        provider=model.provider,
        # The worst model of the chain: whichever serves, the hold covers it.
        hold_micro=max([plan.hold_micro, *(entry.hold_micro for entry in chain)]),
        input_estimate=plan.input_estimate,
        max_tokens=plan.max_tokens,
        price_input_per_mtok=str(model.price.input_per_mtok),
        price_output_per_mtok=str(model.price.output_per_mtok),
        price_cached_input_per_mtok=_rate(model.price.cached_input_per_mtok),
        price_cache_write_per_mtok=_rate(model.price.cache_write_per_mtok),
        status="active",
        charged_micro=None,
        created_at=now,
        expires_at=hold_expires_at,
        settled_at=None,
        api_key_id=principal.api_key_id,
        fallbacks=[entry.record() for entry in chain] or None,
    )
    # Lock order, as in settlement: the company row (the hold), then the budget
    # periods (`budgets`), then the session row. A new session's row is nobody
    # else's yet: on PostgreSQL a first turn of one message is written with the
    # hold, in one statement (`init_writes`).
    postgres = unit.postgres
    first_turn = None
    if chat is None and postgres:
        first_turn = init_writes.first_turn(
            session_id, company.id, principal.user_id, new_turn, limits.session, now
        )
    # The common init's one write is its unit's last statement: begun lazily
    # (`Database.unit(begin=False)`), it runs on its own, atomic by itself, with no
    # BEGIN or COMMIT round trip (issue 14). Budgets or an existing session follow
    # it in the same transaction.
    last = first_turn is not None and not company.has_budgets
    if on_write is not None:
        on_write()
    if not postgres:
        take_hold(unit.session(), Reservation(**reservation.row()))
    elif not init_writes.hold(unit.last_on if last else unit.on, reservation, first_turn):
        raise InsufficientCredits()
    if company.has_budgets:
        hold_budgets(unit.session(), principal, reservation)
    appended: chat_sessions.Appended = "appended"
    if chat is not None:
        # Dated the reservation's instant, as a first turn's rows are: what its
        # hold's release takes back (`chat_sessions.take_back_turn`).
        appended = chat_sessions.append_messages(
            unit.session(), chat.id, new_turn, limits.session, turn_at=now
        )
    elif first_turn is None:
        appended = chat_sessions.create_with_messages(
            unit.session(), session_id, company.id, principal.user_id, new_turn, limits.session, now
        )
    if appended == "gone":
        # Deleted since it was read above (the delete held its row): this turn would
        # hold, and stream the deleted history, for a session that no longer exists.
        raise SessionNotFound()
    if appended == "full":
        raise SessionFull(
            f"This chat session is full (at most {limits.session.max_messages} messages and "
            f"{limits.session.max_bytes} bytes); start a new session."
        )
    return Reserved(reservation, messages, stash, route, tuple(chain))


def _api_type(catalog: Catalog, model: ModelSpec) -> str:
    """The wire format `model` is sent in (a company's models route to packaged
    providers only, `company_llm.company_catalog`)."""
    return catalog.providers[model.provider].api_type


def plan_chain(
    catalog: Catalog,
    cat: company_llm.CompanyCatalog,
    model: ModelSpec,
    req: InitRequest,
    messages: list[dict[str, Any]],
    max_tokens: int,
    pools: dict[str, list[str]],
    size: InputSize | None = None,
) -> list[ChainEntry]:
    """`model`'s fallbacks the company may use that can take this request, each with
    its own input estimate, output cap (`max_tokens`, or less if the fallback allows
    less) and hold (`control_plane.fallbacks`)."""
    chain: list[ChainEntry] = []
    specs = company_llm.chain_of(cat, model)
    if not specs:
        return chain  # the common init: no scan of the messages below
    # The messages carry tool calls or results (a stored session's, sent to a model
    # with tools): a fallback without tools could not take them, so it is skipped.
    wanted = req.features
    if "tools" not in wanted and uses_tools(messages, {}):
        wanted = (*wanted, "tools")
    for spec in specs:
        try:
            check_features(spec, wanted)
            check_content(spec, req.content_features)
            cap = min(max_tokens, spec.max_output_tokens)
            plan = plan_hold(
                spec,
                messages,
                cap,
                req.params,
                _api_type(catalog, spec),
                billed_context=billed_context_of(catalog, spec, own_key=spec.provider in pools),
                size=size,
            )
        except (UnsupportedFeature, UnsupportedContent, ValidationFailed, InputTooLarge):
            continue
        pool = tuple(pools.get(spec.provider, ()))
        route = company_llm.route_for(catalog, spec, pool[0] if pool else None, pool)
        chain.append(ChainEntry(spec, plan.input_estimate, cap, plan.hold_micro, route))
    return chain


def _company_llm(
    unit: Unit,
    catalog: Catalog,
    fernet: MultiFernet | None,
    company_id: str,
    cached: catalog_cache.Lookup | None,
) -> catalog_cache.CompanyLLM:
    """The company's overrides and own keys: from memory when the cache holds them
    under the version read for this init (`catalog_cache`), else from the database."""
    if cached is not None and (hit := cached.get(company_id)) is not None:
        return hit
    session = unit.session()
    llm = catalog_cache.CompanyLLM(
        overrides=tuple(
            catalog_cache.detached(row) for row in company_llm.load_overrides(session, company_id)
        ),
        pools=(
            company_llm.own_key_pools(session, fernet, company_id, catalog)
            if fernet is not None
            else {}
        ),
    )
    if cached is not None:
        cached.put(company_id, llm)
    return llm


def _check_results(
    session: Session,
    chat: ChatSession | None,
    history: list[dict[str, Any]],
    results: list[dict[str, Any]],
    field: str,
    problem: str | None = None,
) -> None:
    """422 unless every `tool` message of `results` (the new turn) answers, once, a
    call of the assistant message that ends `history` (a stored session's), so that
    it is sent next to its call (`tool_shapes.paired`); 409 ``turn_in_progress`` when
    the calls may still be on their way (the session's previous turn is unsettled)."""
    try:
        check_results_follow_calls(history, results, field)
    except InputRejected as exc:
        if chat is not None and _turn_unsettled(session, chat.id):
            # The calls arrive in the session with the previous turn's usage
            # webhook: a client quick off the mark is early, not wrong.
            raise TurnInProgress() from None
        raise ValidationFailed(field, problem or exc.problem) from None


def _turn_unsettled(session: Session, session_id: str) -> bool:
    """Whether a turn of this session still holds credits (its stream has not been
    settled, so its reply is not stored yet)."""
    held = select(col(Reservation.id)).where(
        col(Reservation.session_id) == session_id, col(Reservation.status) == "active"
    )
    return session.scalar(held.limit(1)) is not None


def _with_agent(
    unit: Unit, cat: company_llm.CompanyCatalog, company_id: str, req: InitRequest
) -> tuple[InitRequest, list[dict[str, Any]]]:
    """`req` with its agent applied (`agents.for_init`), and the messages that go
    before the conversation: the agent's system prompt, sent and held for on every
    turn but never stored in the session's history."""
    if req.agent is None:
        return req, []
    turn = agents.for_init(unit.session(), cat, company_id, req)
    return turn.request, turn.prefix


def hold_budgets(session: Session, principal: Principal, reservation: NewReservation) -> None:
    """The hold counted against the caller's budgets too (issue 16.3): its user's, its
    API key's, its teams'; BudgetExceeded (402) rolls back the whole init."""
    budgets.hold(
        session,
        reservation_id=reservation.id,
        company_id=reservation.company_id,
        user_id=reservation.user_id,
        api_key_id=principal.api_key_id,
        hold_micro=reservation.hold_micro,
        now=reservation.created_at,
    )


async def count_tokens(deps: Deps, reservation: NewReservation, at: float) -> None:
    """Tokens per minute (`tpm`): the hold's token estimate counted in the window of
    `at`, the init's instant on the store's clock (its reservation's id carries it).
    Refused (429 ``tpm_exceeded``), the hold just taken is released."""
    limits = tpm.TpmLimits.of(deps.settings)
    if not limits.on:
        return
    try:
        await tpm.take(
            deps.store,
            limits,
            user_id=reservation.user_id,
            company_id=reservation.company_id,
            tokens=reservation.input_estimate + reservation.max_tokens,
            now=at,
        )
    except Exception:
        await release_hold(deps, reservation, "tokens per minute")
        await pending_inits.forget(
            deps.store, reservation.user_id, reservation.company_id, reservation.jti
        )
        raise


@dataclass(slots=True)
class _Held:
    """How far an init got: what its clean-up must give back if it is cancelled."""

    user_id: str
    company_id: str
    jti: str
    reservation: NewReservation | None = None  # its hold committed (and was returned)
    counted: bool = False  # its tokens were counted in the TPM window (`count_tokens`)


async def release_hold(deps: Deps, reservation: NewReservation, reason: str) -> None:
    """Give back an init's own hold (its request refused or cut off after the hold
    committed) and count the release in ``llmgw_cp_credits_released``, as the hold was
    counted in ``_reserved``. Before, neither was: a give-back that failed left the
    hold to the sweeper, whose release was then counted against a hold never
    reserved. One that commits after its 503 is counted then (``late``)."""
    await abandoned_holds.release_counted(
        deps.db, deps.metrics, reservation.id, reason, reservation.user_id
    )


async def _give_back(deps: Deps, held: _Held) -> None:
    """The clean-up of an init cancelled after `init_gate` counted it: its grant is
    no longer pending; its hold, if the init had it back, released (one still in
    flight is `late`'s to release) and its tokens taken out of the window. Nobody
    has its token. Best effort, as each clean-up above: what fails waits for its
    deadline (the sweeper, the window's end)."""
    reservation = held.reservation
    if reservation is not None:
        try:
            await release_hold(deps, reservation, "init cancelled")
        except Exception as exc:
            log.warning("could not release cancelled init's hold %s: %r", reservation.id, exc)
        if held.counted:
            await tpm.correct(
                deps.store,
                tpm.TpmLimits.of(deps.settings),
                user_id=reservation.user_id,
                company_id=reservation.company_id,
                held_tokens=reservation.input_estimate + reservation.max_tokens,
                used_tokens=0,
                counted_at=tpm.counted_at(reservation.id),
                now=deps.clock(),
            )
    await pending_inits.forget(deps.store, held.user_id, held.company_id, held.jti)


def hold_deadline(issued: int, settings: ControlPlaneSettings) -> datetime:
    """When the sweeper may reconcile a hold whose stream never reported: the
    token's expiry plus `LLMGW_HOLD_GRACE_SECONDS`. `ControlPlaneSettings` guarantees that grace
    covers the longest stream the token can start (issue 11.4), so a live stream is
    never settled from a checkpoint for running long."""
    return datetime.fromtimestamp(
        issued + settings.token_ttl_seconds + settings.hold_grace_seconds, UTC
    )


def _iso_z(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def init_chat(
    deps: Deps, principal: Principal, req: InitRequest, request_id: str
) -> dict[str, Any]:
    """Reserve, stash, mint. Returns the response's `data`."""
    if not can_chat(principal):
        raise Forbidden("This needs a user with the llm:chat:send scope.")
    # The key to sign with, as of at most a minute ago (a clock check, a read once a
    # minute): an instance that only serves API-key or the edges' inits never logs
    # anyone in, the other refresh, and would sign with a key another instance
    # retired, which the edges refuse (`unknown_kid`). Before the hold: a failed
    # read holds nothing.
    keyring = await deps.fresh_keyring()
    settings = deps.settings
    now = datetime.fromtimestamp(deps.wall_clock(), UTC)
    issued = int(now.timestamp())
    ttl = settings.token_ttl_seconds
    jti = uuid.uuid4().hex
    hold_expires_at = hold_deadline(issued, settings)
    # Its tokens' window is named on the store's clock, as every replica's, and its
    # reservation's id carries that instant to the settlement's correction, which
    # may run on a replica whose clocks disagree with this one's (`time_ids`).
    store_now = deps.clock()
    reservation_id = time_ids.time_id(store_now)
    tpm_at = tpm.counted_at(reservation_id)
    assert tpm_at is not None
    assert principal.user_id is not None and principal.company_id is not None
    user_id = principal.user_id
    llm = await init_gate.enter(
        deps.store,
        settings,
        user_id=user_id,
        company_id=principal.company_id,
        jti=jti,
        expires_at=hold_expires_at.timestamp(),
        at=init_gate.Moment(rate_now=store_now, tpm_now=tpm_at, wall_now=now.timestamp()),
        cache=deps.catalog_cache,
    )
    # What a cancelled init (the server's shutdown cuts its request off) gives back.
    held: _Held = _Held(user_id, principal.company_id, jti)
    written: list[bool] = []  # set on the database thread once the hold's write is sent
    try:
        try:
            reserved = await deps.db.unit(
                lambda unit: reserve(
                    unit,
                    settings.catalog,
                    principal,
                    req,
                    jti=jti,
                    request_id=request_id,
                    now=now,
                    hold_expires_at=hold_expires_at,
                    fernet=deps.fernet,
                    limits=StorageLimits.of(settings),
                    llm_cache=llm,
                    reservation_id=reservation_id,
                    on_write=lambda: written.append(True),
                ),
                begin=False,
                # Committed after this init was answered 503: nobody has its token.
                late=lambda late: abandoned_holds.release_later(
                    deps.db, deps.metrics, late.reservation, user_id
                ),
            )
        except Exception as exc:  # 402, 404, 413…: this grant never existed (a 503
            # past the database's bound: never, or released by `late` once it commits)
            await pending_inits.forget(deps.store, user_id, principal.company_id, jti)
            if written and outcome_unknown(exc):
                # The connection died with the write sent: it may have committed, for
                # a client told 503 with no token. Given back if it did.
                abandoned_holds.release_unacknowledged(
                    deps.db, deps.metrics, reservation_id, user_id, lost_backend(exc)
                )
            raise
        reservation = held.reservation = reserved.reservation
        # Counted once committed, as the ledger's hold entry: whatever ends it, its
        # release by this init included, is counted too (`release_hold`), so that
        # reserved - charged - released is what is held at every moment.
        deps.metrics.reserved(reservation.hold_micro)
        await count_tokens(deps, reservation, tpm_at)
        held.counted = tpm.TpmLimits.of(settings).on
        try:
            await deps.store.set(
                stash_key(principal.company_id, jti), reserved.stash, ttl + STASH_EXTRA_TTL_SECONDS
            )
        except Exception:
            log.exception("could not stash request %s; releasing its hold", request_id)
            await release_hold(deps, reservation, "stash failed")
            await pending_inits.forget(deps.store, user_id, principal.company_id, jti)
            raise StoreUnavailable() from None
    except asyncio.CancelledError:
        # Not an `Exception`: the clean-ups above miss it. Run in the background,
        # so the cancellation goes on up at once; the lifespan waits for it.
        in_background(_give_back(deps, held), "cancelled-init")
        raise
    assert principal.user_id is not None and principal.company_id is not None
    claims = stream_claims(
        user_id=principal.user_id,
        company_id=principal.company_id,
        role=principal.role,
        scopes=[s for s in ALL_SCOPES if s in principal.scopes],
        session_id=reservation.session_id,
        model=reservation.model,
        max_tokens=reservation.max_tokens,
        max_input_tokens=reservation.input_estimate,
        reservation_id=reservation.id,
        request_id=request_id,
        now=issued,
        ttl_seconds=ttl,
        jti=jti,
    )
    if principal.token_id is not None:
        # Signing the session out (`logout`) then ends this stream token too.
        claims[PARENT_CLAIM] = principal.token_id
    elif principal.api_key_id is not None:
        # So does revoking the key, even when this init's hold commits after the
        # revocation looked for the key's open holds (`routes.admin.revoke_api_key`).
        claims[PARENT_CLAIM] = api_key_parent(principal.api_key_id)
    if req.agent is not None:
        # The edge's POST /v1/chat/completions takes its messages and tools from the
        # body, which would bypass the agent: it refuses tokens that carry this claim.
        claims[AGENT_CLAIM] = req.agent
    if reserved.route is not None:
        # The company's own key or model, sealed for the edge only (`shared.route_claim`).
        claims[ROUTE_CLAIM] = seal(reserved.route, deps.route_cipher)
    if reserved.chain:
        claims[FALLBACKS_CLAIM] = [
            FallbackGrant(
                entry.model.id,
                entry.input_estimate,
                seal(entry.route, deps.route_cipher) if entry.route is not None else None,
                entry.max_tokens,
            ).claim()
            for entry in reserved.chain
        ]
    kid, key = keyring.active()
    token = sign_token(claims, key, kid)
    edge = settings.edge_public_url
    return {
        "stream_token": token,
        "stream_url": f"{edge}/v1/stream?token={token}",
        "completions_url": f"{edge}/v1/chat/completions",
        "expires_at": _iso_z(claims["exp"]),
        "session_id": reservation.session_id,
        "model": reservation.model,
        "max_tokens": reservation.max_tokens,
        "reservation_id": reservation.id,
        "reserved_credits": format_credits(reservation.hold_micro),
    }
