"""Chat sessions and their messages: data functions that take a DB session and do
not commit (the calling use case owns the transaction).

A session holds at most `SessionLimits` messages and bytes
(``LLMGW_MAX_SESSION_MESSAGES`` / ``LLMGW_MAX_SESSION_BYTES``, issue 12.6; every
stored byte of a message counts, `stored_bytes`): its row counts both, and an append
is one conditional UPDATE of those counters, so two concurrent appends can never
pass the caps together. Messages are read a page at a
time (`messages_page`): a full session is never loaded whole into one response.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson
import psycopg
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import hot_statements, policy, settle_statements
from control_plane.errors import Forbidden, SessionNotFound
from control_plane.pagination import Page, PageRequest, merged_page, newest_first, walk_began
from control_plane.policy import Principal
from control_plane.stream_revocations import mark_revoked
from control_plane.tables import (
    ChatMessage,
    ChatSession,
    Reservation,
    UsageRecord,
    User,
    iso,
    new_id,
    rowcount,
    utcnow,
)
from control_plane.validation import without_nul

TITLE_MAX = 80

Appended = Literal["appended", "gone", "full"]


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_messages: int = 1000
    max_bytes: int = 1024 * 1024


def stored_bytes(messages: Iterable[dict[str, Any]]) -> int:
    """What messages cost against the session's byte cap: every field a message row
    stores (`_message_rows`), its role, its text, its tool calls as the JSON they are
    stored as and a tool result's call id. The call id (up to 256 characters) once
    went uncounted: 1,000 `tool` messages stored about 256 KB past the cap."""
    return sum(
        len(m["role"].encode("utf-8"))
        + len(m["content"].encode("utf-8"))
        + (len(orjson.dumps(m["tool_calls"])) if m.get("tool_calls") else 0)
        + len((m.get("tool_call_id") or "").encode("utf-8"))
        for m in messages
    )


def title_from(messages: Iterable[dict[str, Any]]) -> str:
    for message in messages:
        if message["role"] == "user" and message["content"].strip():
            text = " ".join(message["content"].split())
            return text if len(text) <= TITLE_MAX else text[: TITLE_MAX - 1] + "…"
    return "New chat"


def _tool_fields(message: ChatMessage) -> dict[str, Any]:
    """A stored message's tool call fields, present only when set (OpenAI's shape)."""
    out: dict[str, Any] = {}
    if message.tool_calls:
        out["tool_calls"] = message.tool_calls
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def history(session: Session, session_id: str) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(ChatMessage)
        .where(col(ChatMessage.session_id) == session_id)
        .order_by(col(ChatMessage.seq))
    )
    return [{"role": m.role, "content": m.content, **_tool_fields(m)} for m in rows]


def append_messages(
    session: Session,
    session_id: str,
    messages: Iterable[dict[str, Any]],
    limits: SessionLimits | None = None,
    turn_at: datetime | None = None,
) -> Appended:
    """Append in order: ``"appended"``, ``"gone"`` when the session no longer exists,
    ``"full"`` (nothing written) when the messages would pass `limits`. `turn_at`
    dates the messages (init passes its reservation's instant: what names the turn
    for `take_back_turn`); the session's `updated_at` is the moment of the append.

    The counters' UPDATE also locks the session row (PostgreSQL), so two concurrent
    appends number their messages one after the other."""
    limits = limits or SessionLimits()
    # Inputs with NUL are refused at the door (400); a model's reply is not ours to
    # refuse, so it is made storable here: PostgreSQL text cannot hold NUL.
    rows = [{**m, "content": without_nul(m.get("content") or "")} for m in messages]
    added, size = len(rows), stored_bytes(rows)
    now = utcnow()
    touched = session.execute(
        hot_statements.APPEND_TO_SESSION,
        {
            "p_id": session_id,
            "p_added": added,
            "p_size": size,
            "p_max_messages": limits.max_messages,
            "p_max_bytes": limits.max_bytes,
            "p_now": now,
        },
    )
    if rowcount(touched) == 0:
        exists = session.scalar(hot_statements.SELECT_SESSION_ID, {"p_id": session_id})
        return "gone" if exists is None else "full"
    last = session.scalar(hot_statements.SELECT_LAST_SEQ, {"p_id": session_id})
    _insert_messages(session, session_id, rows, int(last or 0) + 1, turn_at or now)
    return "appended"


def take_back_turn(session: Session, session_id: str, turn_at: datetime) -> int:
    """Remove what an init stored of its turn, dated `turn_at` (its reservation's
    instant: the first turn's rows, or the messages it appended), once its hold was
    given back whole: the init was refused after its hold (429 ``tpm_exceeded``, a
    failed stash, a cancellation), or its stream never ran (the sweeper released the
    hold at its deadline). Nothing was billed for it, so it is not kept: else each
    abandoned init was free storage, up to a model's context of text for good.

    The session's counters go down by what left; a session left with no message
    goes too. Its row is taken first, as an append's counter UPDATE and
    `delete_session` take it, so a turn being appended meanwhile is numbered and
    counted after. The messages the session's answers appended carry their own
    moments (the settlement's), never a turn's; a client-owned history is the
    first turn's, its `assistant` messages included. Returns how many messages were removed."""
    chat = session.execute(
        select(col(ChatSession.message_count), col(ChatSession.content_bytes))
        .where(col(ChatSession.id) == session_id)
        .with_for_update()
    ).first()
    if chat is None:
        return 0
    gone = session.execute(
        delete(ChatMessage)
        .where(
            col(ChatMessage.session_id) == session_id,
            col(ChatMessage.created_at) == turn_at,
        )
        .returning(
            col(ChatMessage.role),
            col(ChatMessage.content),
            col(ChatMessage.tool_calls),
            col(ChatMessage.tool_call_id),
        )
    ).all()
    if not gone:
        return 0
    remaining = session.scalar(
        select(col(ChatMessage.id)).where(col(ChatMessage.session_id) == session_id).limit(1)
    )
    if remaining is None:
        session.execute(delete(ChatSession).where(col(ChatSession.id) == session_id))
        return len(gone)
    size = stored_bytes(
        {"role": role, "content": content, "tool_calls": calls, "tool_call_id": call_id}
        for role, content, calls, call_id in gone
    )
    session.execute(
        update(ChatSession)
        .where(col(ChatSession.id) == session_id)
        .values(
            message_count=max(int(chat.message_count) - len(gone), 0),
            content_bytes=max(int(chat.content_bytes) - size, 0),
        )
    )
    return len(gone)


def append_replies(
    session: Session, replies: Sequence[tuple[str, dict[str, Any], SessionLimits]]
) -> list[Appended]:
    """Each (session id, message, limits) appended, as `append_messages` one by one
    would, with one counter UPDATE for all the sessions, and one INSERT of all
    the messages, numbered after each session's last (a settlement batch's replies, issue
    14.2). A session whose replies together would pass its caps, or that is gone,
    takes them one at a time instead, so that those that fit are still kept."""
    if not replies:
        return []
    now = utcnow()
    grouped: dict[str, list[int]] = {}
    for i, (session_id, _, _) in enumerate(replies):
        grouped.setdefault(session_id, []).append(i)
    rows = [{**m, "content": without_nul(m.get("content") or "")} for _, m, _ in replies]
    growth = []
    for session_id, indexes in grouped.items():
        limits = replies[indexes[0]][2]
        if all(replies[i][2] == limits for i in indexes):
            size = stored_bytes(rows[i] for i in indexes)
            growth.append((session_id, len(indexes), size, limits.max_messages, limits.max_bytes))
    grown = settle_statements.grow_sessions(session, growth, now) if growth else set()
    values = [
        value
        for session_id in sorted(grown)
        for value in _message_rows(session_id, [rows[i] for i in grouped[session_id]], 1, now)
    ]
    settle_statements.insert_messages_after_last(session, values)
    results: list[Appended] = []
    for session_id, message, limits in replies:
        if session_id in grown:
            results.append("appended")
        else:
            results.append(append_messages(session, session_id, [message], limits))
    return results


def append_reply(
    driver: psycopg.Connection[Any], session_id: str, message: dict[str, Any], limits: SessionLimits
) -> Appended:
    """`append_replies` of one reply on a psycopg connection itself, in its
    transaction (a lone webhook's, `webhook_settlement.settle_alone`: no ORM session): the
    counters' UPDATE, then the message numbered after the session's last. When the
    UPDATE matches nothing, one read says whether the session is gone or full (a
    lone reply has no others to be retried apart from)."""
    row = {**message, "content": without_nul(message.get("content") or "")}
    now = utcnow()
    growth = (session_id, 1, stored_bytes([row]), limits.max_messages, limits.max_bytes)
    if not settle_statements.grow_sessions(driver, [growth], now):
        return "full" if settle_statements.session_exists(driver, session_id) else "gone"
    settle_statements.insert_messages_after_last(driver, _message_rows(session_id, [row], 1, now))
    return "appended"


def messages_page(
    session: Session, session_id: str, limit: int, after_seq: int | None
) -> tuple[list[ChatMessage], int | None]:
    """Up to `limit` messages in conversation order after `after_seq`, and the
    position to continue from (None on the last page)."""
    stmt = select(ChatMessage).where(col(ChatMessage.session_id) == session_id)
    if after_seq is not None:
        stmt = stmt.where(col(ChatMessage.seq) > after_seq)
    rows = list(session.scalars(stmt.order_by(col(ChatMessage.seq)).limit(limit + 1)))
    page = rows[:limit]
    return page, (page[-1].seq if len(rows) > limit else None)


def delete_session(session: Session, session_id: str) -> None:
    # The session's row first, as an append's counter UPDATE takes it: a turn being
    # appended commits before the messages are read for deletion (they go with the
    # rest), or finds the session gone. Unlocked, its message committed between the
    # two DELETEs and the second broke the messages' foreign key (a 500).
    session.execute(
        select(col(ChatSession.id)).where(col(ChatSession.id) == session_id).with_for_update()
    )
    session.execute(delete(ChatMessage).where(col(ChatMessage.session_id) == session_id))
    session.execute(delete(ChatSession).where(col(ChatSession.id) == session_id))


def list_sessions(
    session: Session, p: Principal, req: PageRequest, now: datetime
) -> Page[ChatSession]:
    """The caller's sessions (its whole company's for those who see it all), the
    most recently active first, as they stood when the walk began (`req.as_of`,
    `now` on a first page): a session continued since then keeps the place it had,
    so the walk shows it once, neither skipped (it moved ahead of the cursor) nor
    repeated; one created since then waits for a new first page. A walk lasts at
    most an hour (`walk_began`): the sessions continued since it began take the
    slower second query."""
    stmt = select(ChatSession).where(col(ChatSession.company_id) == p.company_id)
    if policy.sees_whole_company(p):
        # Of its own users ranked at or below it (`policy.can_read_session`).
        readable = select(col(User.id)).where(
            col(User.company_id) == p.company_id,
            col(User.role).in_(policy.roles_at_or_below(p)),
        )
        stmt = stmt.where(col(ChatSession.user_id).in_(readable))
    else:
        stmt = stmt.where(col(ChatSession.user_id) == p.user_id)
    as_of = walk_began(req.as_of, now)
    updated, sid = col(ChatSession.updated_at), col(ChatSession.id)
    # Untouched since: placed by `updated_at`, an index range as before.
    still = [(row, row.updated_at) for row in session.scalars(
        newest_first(stmt.where(updated <= as_of), updated, sid, req)
    )]  # fmt: skip
    # Continued since (a few: those active during the walk): placed by their last
    # message then, which is what `updated_at` said (a turn stamps both alike).
    then = func.coalesce(
        select(func.max(col(ChatMessage.created_at)))
        .where(col(ChatMessage.session_id) == sid, col(ChatMessage.created_at) <= as_of)
        .scalar_subquery(),
        col(ChatSession.created_at),
    ).label("then")
    moved = stmt.add_columns(then).where(updated > as_of, col(ChatSession.created_at) <= as_of)
    continued = [(row, moment) for row, moment in session.execute(
        newest_first(moved, then, sid, req)
    )]  # fmt: skip
    return merged_page(still + continued, req, as_of)


def _owner_role(session: Session, chat: ChatSession) -> str | None:
    user = session.get(User, chat.user_id)
    return user.role if user is not None else None


def _readable(session: Session, p: Principal, session_id: str) -> tuple[ChatSession, str | None]:
    """The session and its user's role; 404 unless the caller may read it."""
    chat = session.get(ChatSession, session_id)
    if chat is None:
        raise SessionNotFound()
    role = _owner_role(session, chat)
    if not policy.can_read_session(p, chat.user_id, chat.company_id, role):
        raise SessionNotFound()
    return chat, role


def read_session(
    session: Session, p: Principal, session_id: str, limit: int, after_seq: int | None
) -> tuple[ChatSession, list[ChatMessage], int | None]:
    """A session the caller may read, a page of its messages and where the next
    page starts (`messages_page`); 404 for one it may not, as for one that is not."""
    chat, _role = _readable(session, p, session_id)
    messages, last_seq = messages_page(session, chat.id, limit, after_seq)
    return chat, messages, last_seq


@dataclass(frozen=True, slots=True)
class SessionStreams:
    """A session's company and the `jti` of each stream token of its turns that may
    still start, run or be resumed (`stream_ids`)."""

    company_id: str
    jtis: frozenset[str]


def stream_ids(session: Session, chat: ChatSession, ended_since: datetime) -> frozenset[str]:
    """The `jti`s of the session's turns whose stream tokens still work at the edges:
    a hold still active (the token unused, or its stream running or waiting for its
    report) or settled since `ended_since` (its stream ended within the resume grace,
    so its URL still replays the answer with `Last-Event-ID`). Read by the active
    holds' index and the user's usage index: a few rows each."""
    active = select(col(Reservation.jti)).where(
        col(Reservation.status) == "active",
        col(Reservation.company_id) == chat.company_id,
        col(Reservation.session_id) == chat.id,
    )
    ended = select(col(UsageRecord.jti)).where(
        col(UsageRecord.user_id) == chat.user_id,
        col(UsageRecord.created_at) >= ended_since,
        col(UsageRecord.session_id) == chat.id,
    )
    return frozenset([*session.scalars(active), *session.scalars(ended)])


def _deletable(session: Session, p: Principal, session_id: str) -> ChatSession:
    """404 unless the caller may read the session, 403 unless it may also delete it."""
    chat, role = _readable(session, p, session_id)
    if not policy.can_delete_session(p, chat.user_id, chat.company_id, role):
        raise Forbidden("This needs the llm:chat:delete scope.")
    return chat


def streams_to_end(
    session: Session, p: Principal, session_id: str, ended_since: datetime
) -> SessionStreams:
    """Before a deletion: the session's streams (`stream_ids`), for a caller that may
    delete it (404 / 403 as `remove_session`); nothing is changed."""
    chat = _deletable(session, p, session_id)
    return SessionStreams(chat.company_id, stream_ids(session, chat, ended_since))


def remove_session(
    session: Session,
    p: Principal,
    session_id: str,
    ended_since: datetime,
    recorded: frozenset[str] = frozenset(),
) -> SessionStreams:
    """Delete a session and its messages (404 / 403 as `_deletable`), and say which
    streams its turns still have (`stream_ids`, read once the session's row is held:
    a turn appended meanwhile committed first, and its hold is among them).
    `recorded`: those whose revocation is recorded already (`routes.chat`)."""
    chat = _deletable(session, p, session_id)
    delete_session(session, chat.id)
    ended = SessionStreams(chat.company_id, stream_ids(session, chat, ended_since))
    # Their tokens are revoked at the edges (`routes.chat`); recorded, so a store
    # that loses those keys gets them back (`revocation_republish`). Only a turn
    # appended since the first look is left to record here, holding the session's
    # row: the others' rows may be held by their settlement, which waits on it.
    mark_revoked(session, chat.company_id, ended.jtis - recorded, utcnow())
    return ended


def session_public(chat: ChatSession, messages: list[ChatMessage] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": chat.id,
        "title": chat.title,
        "user_id": chat.user_id,
        "created_at": iso(chat.created_at),
        "updated_at": iso(chat.updated_at),
    }
    if messages is not None:
        doc["messages"] = [
            {
                "id": m.id,
                "role": m.role,
                "content": m.content,
                **_tool_fields(m),
                "created_at": iso(m.created_at),
            }
            for m in messages
        ]
    return doc


@dataclass(frozen=True, slots=True)
class NewSession:
    """A new session's row and its messages' rows (numbered from 1), as written."""

    session: dict[str, Any]
    messages: list[dict[str, Any]]


def new_session_rows(
    session_id: str,
    company_id: str,
    user_id: str,
    messages: list[dict[str, Any]],
    limits: SessionLimits,
    now: datetime,
) -> NewSession | None:
    """The rows of a new session `session_id` holding `messages`, its counters set
    at once; None when the messages alone pass `limits` (a new session has no
    history to lock or number after). The one builder of these rows, whether they
    go as two INSERTs (`create_with_messages`) or with init's hold in one
    statement (`init_writes.first_turn`)."""
    rows = [{**m, "content": without_nul(m.get("content") or "")} for m in messages]
    size = stored_bytes(rows)
    if len(rows) > limits.max_messages or size > limits.max_bytes:
        return None
    session = {
        "id": session_id,
        "company_id": company_id,
        "user_id": user_id,
        "title": without_nul(title_from(rows)),
        "created_at": now,
        "updated_at": now,
        "message_count": len(rows),
        "content_bytes": size,
    }
    return NewSession(session, _message_rows(session_id, rows, 1, now))


def create_with_messages(
    session: Session,
    session_id: str,
    company_id: str,
    user_id: str,
    messages: list[dict[str, Any]],
    limits: SessionLimits | None = None,
    now: datetime | None = None,
) -> Appended:
    """A new session `session_id` holding `messages` (`new_session_rows`): two
    INSERTs, no read, no ORM (init's hot path, issue 14.3). ``"full"``, and nothing
    written, when the messages alone pass `limits`."""
    rows = new_session_rows(
        session_id, company_id, user_id, messages, limits or SessionLimits(), now or utcnow()
    )
    if rows is None:
        return "full"
    session.execute(hot_statements.INSERT_SESSION, rows.session)
    _insert_message_rows(session, rows.messages)
    return "appended"


def _insert_messages(
    session: Session, session_id: str, rows: list[dict[str, Any]], first_seq: int, now: datetime
) -> None:
    """`rows` numbered from `first_seq`, one INSERT (executemany for several)."""
    _insert_message_rows(session, _message_rows(session_id, rows, first_seq, now))


def _insert_message_rows(session: Session, values: list[dict[str, Any]]) -> None:
    if values:
        session.execute(hot_statements.INSERT_MESSAGES, values if len(values) > 1 else values[0])


def _message_rows(
    session_id: str, rows: list[dict[str, Any]], first_seq: int, now: datetime
) -> list[dict[str, Any]]:
    return [
        {
            "id": new_id(),
            "session_id": session_id,
            "role": m["role"],
            "content": m["content"],
            "created_at": now,
            "seq": seq,
            "tool_calls": m.get("tool_calls"),
            "tool_call_id": m.get("tool_call_id"),
        }
        for seq, m in enumerate(rows, start=first_seq)
    ]
