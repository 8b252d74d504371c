"""Chat sessions and their messages: data functions that take a DB session and do
not commit (the calling use case owns the transaction)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane.tables import ChatMessage, ChatSession, iso, new_id, rowcount, utcnow

TITLE_MAX = 80


def title_from(messages: Iterable[dict[str, Any]]) -> str:
    for message in messages:
        if message["role"] == "user" and message["content"].strip():
            text = " ".join(message["content"].split())
            return text if len(text) <= TITLE_MAX else text[: TITLE_MAX - 1] + "…"
    return "New chat"


def create_session(
    session: Session, company_id: str, user_id: str, title: str, now: datetime | None = None
) -> ChatSession:
    moment = now or utcnow()
    chat = ChatSession(
        id=new_id(),
        company_id=company_id,
        user_id=user_id,
        title=title,
        created_at=moment,
        updated_at=moment,
    )
    session.add(chat)
    session.flush()
    return chat


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


def append_messages(session: Session, session_id: str, messages: Iterable[dict[str, Any]]) -> bool:
    """Append in order; False when the session is gone. Touching the session row
    first locks it (PostgreSQL) so two concurrent appends number their messages one
    after the other."""
    now = utcnow()
    touched = session.execute(
        update(ChatSession).where(col(ChatSession.id) == session_id).values(updated_at=now)
    )
    if rowcount(touched) == 0:
        return False
    last = session.scalar(
        select(func.max(col(ChatMessage.seq))).where(col(ChatMessage.session_id) == session_id)
    )
    seq = int(last or 0)
    for message in messages:
        seq += 1
        session.add(
            ChatMessage(
                id=new_id(),
                session_id=session_id,
                role=message["role"],
                content=message["content"],
                created_at=now,
                seq=seq,
                tool_calls=message.get("tool_calls"),
                tool_call_id=message.get("tool_call_id"),
            )
        )
    session.flush()
    return True


def delete_session(session: Session, session_id: str) -> None:
    session.execute(delete(ChatMessage).where(col(ChatMessage.session_id) == session_id))
    session.execute(delete(ChatSession).where(col(ChatSession.id) == session_id))


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
