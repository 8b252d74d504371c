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
from control_plane.validation import without_nul

TITLE_MAX = 80


def title_from(messages: Iterable[dict[str, str]]) -> str:
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
        title=without_nul(title),
        created_at=moment,
        updated_at=moment,
    )
    session.add(chat)
    session.flush()
    return chat


def history(session: Session, session_id: str) -> list[dict[str, str]]:
    rows = session.scalars(
        select(ChatMessage)
        .where(col(ChatMessage.session_id) == session_id)
        .order_by(col(ChatMessage.seq))
    )
    return [{"role": m.role, "content": m.content} for m in rows]


def append_messages(session: Session, session_id: str, messages: Iterable[dict[str, str]]) -> bool:
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
                # Inputs with NUL are refused at the door; a model's output is not
                # ours to refuse, so it is made storable here (PostgreSQL text).
                content=without_nul(message["content"]),
                created_at=now,
                seq=seq,
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
            {"id": m.id, "role": m.role, "content": m.content, "created_at": iso(m.created_at)}
            for m in messages
        ]
    return doc
