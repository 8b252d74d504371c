"""Every policy function as one table: (who, action, arguments) → allowed. Deny by
default: a row missing here is a policy nobody decided."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from control_plane import policy
from control_plane.policy import SCOPE_ADMIN, Principal
from shared.tokens import ALL_SCOPES, SCOPE_READ, SCOPE_SEND

EVERY_SCOPE = (*ALL_SCOPES, SCOPE_ADMIN)


def _p(
    role: str,
    company: str | None = "c1",
    scopes: tuple[str, ...] = EVERY_SCOPE,
    user: str | None = "u1",
) -> Principal:
    return Principal(
        user_id=None if company is None else user,
        company_id=company,
        role=role,
        scopes=frozenset(scopes),
        via="t",
    )


ADMIN_TOKEN = _p("admin", None)
ADMIN_USER = _p("admin", "c9")
OWNER = _p("owner")
# API keys narrowed to chat: no admin power whatever the role.
CHAT_OWNER = _p("owner", scopes=ALL_SCOPES)
CHAT_ADMIN = _p("admin", "c9", scopes=(SCOPE_SEND,))
MEMBER = _p("member", scopes=(SCOPE_SEND, SCOPE_READ))
READER = _p("member", scopes=(SCOPE_READ,))
SENDER = _p("member", scopes=(SCOPE_SEND,))
ROLELESS = _p("nobody", scopes=())

F = Callable[..., bool]
TABLE: list[tuple[F, Principal, tuple[Any, ...], bool]] = [
    (policy.can_chat, MEMBER, (), True),
    (policy.can_chat, SENDER, (), True),
    (policy.can_chat, READER, (), False),
    (policy.can_chat, ADMIN_TOKEN, (), False),  # no user, no company
    (policy.can_chat, ROLELESS, (), False),
    (policy.can_read_own_data, READER, (), True),
    (policy.can_read_own_data, SENDER, (), False),
    (policy.can_read_own_data, ADMIN_TOKEN, (), False),
    (policy.sees_whole_company, OWNER, (), True),
    (policy.sees_whole_company, MEMBER, (), False),
    (policy.can_read_session, MEMBER, ("u1", "c1", "member"), True),
    (policy.can_read_session, MEMBER, ("u2", "c1", "member"), False),
    (policy.can_read_session, OWNER, ("u2", "c1", "member"), True),
    (policy.can_read_session, OWNER, ("u2", "c1", "owner"), True),
    (policy.can_read_session, OWNER, ("u2", "c1", "admin"), False),  # ranked above
    (policy.can_read_session, OWNER, ("u2", "c1", None), False),  # its user is gone
    (policy.can_read_session, OWNER, ("u2", "c2", "member"), False),  # another company
    (policy.can_read_session, SENDER, ("u1", "c1", "member"), False),  # no read scope
    (policy.can_delete_session, MEMBER, ("u1", "c1", "member"), False),  # no delete scope
    (policy.can_delete_session, OWNER, ("u2", "c1", "member"), True),
    (policy.can_delete_session, OWNER, ("u2", "c1", "admin"), False),
    (policy.can_delete_session, OWNER, ("u2", "c2", "member"), False),
    (policy.can_use_session, MEMBER, ("u1", "c1"), True),
    (policy.can_use_session, OWNER, ("u2", "c1"), False),  # only its own user
    (policy.can_use_session, READER, ("u1", "c1"), False),
    (policy.can_create_company, ADMIN_TOKEN, (), True),
    (policy.can_create_company, ADMIN_USER, (), True),
    (policy.can_create_company, OWNER, (), False),
    (policy.can_create_company, CHAT_ADMIN, (), False),
    (policy.can_grant_credits, ADMIN_TOKEN, ("c1",), True),
    (policy.can_grant_credits, OWNER, ("c1",), False),  # would mint money
    (policy.can_adjust_credits, ADMIN_TOKEN, ("c1",), True),
    (policy.can_adjust_credits, OWNER, ("c1",), False),
    (policy.can_read_audit, ADMIN_TOKEN, (None,), True),
    (policy.can_read_audit, OWNER, ("c1",), True),
    (policy.can_read_audit, OWNER, (None,), False),
    (policy.can_read_audit, MEMBER, ("c1",), False),
    (policy.can_read_audit, CHAT_OWNER, ("c1",), False),
    (policy.can_read_audit, CHAT_ADMIN, (None,), False),
    (policy.can_admin_company, OWNER, ("c1",), True),
    (policy.can_admin_company, OWNER, ("c2",), False),
    (policy.can_admin_company, MEMBER, ("c1",), False),
    (policy.can_admin_company, ADMIN_TOKEN, ("c2",), True),
    (policy.can_admin_company, CHAT_OWNER, ("c1",), False),
    (policy.can_admin_company, CHAT_ADMIN, ("c1",), False),
    (policy.can_assign_role, OWNER, ("owner",), True),
    (policy.can_assign_role, OWNER, ("admin",), False),
    (policy.can_assign_role, ADMIN_TOKEN, ("admin",), True),
    (policy.can_rotate_signing_keys, ADMIN_TOKEN, (), True),
    (policy.can_rotate_signing_keys, OWNER, (), False),
    (policy.can_assign_role, OWNER, ("member",), True),
    (policy.can_assign_role, MEMBER, ("owner",), False),  # never above one's own
    (policy.can_assign_role, OWNER, ("superuser",), False),
    (policy.can_manage_user, OWNER, ("c1", "member"), True),
    (policy.can_manage_user, OWNER, ("c1", "owner"), True),
    (policy.can_manage_user, OWNER, ("c1", "admin"), False),  # the climb to admin
    (policy.can_manage_user, OWNER, ("c2", "member"), False),
    (policy.can_manage_user, MEMBER, ("c1", "member"), False),
    (policy.can_manage_user, ADMIN_USER, ("c1", "admin"), True),
    (policy.can_manage_user, ADMIN_TOKEN, ("c1", "admin"), True),
    (policy.can_manage_user, CHAT_OWNER, ("c1", "member"), False),
    (policy.can_revoke, ADMIN_TOKEN, ("company", "c1", None), True),
    (policy.can_revoke, OWNER, ("user", "c1", "member"), True),
    (policy.can_revoke, OWNER, ("user", "c1", "owner"), True),
    (policy.can_revoke, OWNER, ("user", "c1", "admin"), False),  # ranked above it
    (policy.can_revoke, OWNER, ("jti", "c1", "member"), True),
    (policy.can_revoke, OWNER, ("jti", "c1", "admin"), False),
    (policy.can_revoke, OWNER, ("jti", "c1", None), False),  # unknown token owner
    (policy.can_revoke, OWNER, ("company", "c1", None), False),  # not its own company
    (policy.can_revoke, OWNER, ("user", "c2", "member"), False),
    (policy.can_revoke, MEMBER, ("jti", "c1", "member"), False),
    (policy.can_lift_revocation, OWNER, ("user", "c1", "member", "owner"), True),
    (policy.can_lift_revocation, OWNER, ("user", "c1", "member", "admin"), False),
    (policy.can_lift_revocation, OWNER, ("user", "c1", "admin", "admin"), False),
    (policy.can_lift_revocation, ADMIN_USER, ("user", "c1", "member", "admin"), True),
    (policy.can_lift_revocation, ADMIN_TOKEN, ("company", "c1", None, "admin"), True),
    (policy.can_list_companies, ADMIN_TOKEN, (), True),
    (policy.can_list_companies, ADMIN_USER, (), True),
    (policy.can_list_companies, OWNER, (), False),
    (policy.can_list_companies, CHAT_ADMIN, (), False),
    (policy.can_revoke, CHAT_OWNER, ("user", "c1", "member"), False),
    (policy.can_configure_llm, CHAT_OWNER, ("c1",), False),
    (policy.can_configure_llm, OWNER, ("c1",), True),
    (policy.can_configure_llm, OWNER, ("c2",), False),
    (policy.can_configure_llm, MEMBER, ("c1",), False),
    (policy.can_configure_llm, ADMIN_TOKEN, ("c1",), True),
    (policy.can_rotate_encryption, ADMIN_TOKEN, (), True),
    (policy.can_rotate_encryption, OWNER, (), False),
    (policy.can_manage_agents, OWNER, ("c1",), True),
    (policy.can_manage_agents, OWNER, ("c2",), False),  # another company's agents
    (policy.can_manage_agents, MEMBER, ("c1",), False),  # uses them, does not manage
    (policy.can_manage_agents, CHAT_OWNER, ("c1",), False),
    (policy.can_manage_agents, ADMIN_TOKEN, ("c2",), True),
    (policy.can_use_agents, MEMBER, ("c1",), True),
    (policy.can_use_agents, SENDER, ("c1",), True),
    (policy.can_use_agents, READER, ("c1",), False),  # cannot chat
    (policy.can_use_agents, OWNER, ("c2",), False),
    (policy.can_use_agents, ADMIN_TOKEN, ("c1",), False),  # no user
    (policy.can_manage_budgets, OWNER, ("c1",), True),
    (policy.can_manage_budgets, OWNER, ("c2",), False),  # another company's budgets
    (policy.can_manage_budgets, MEMBER, ("c1",), False),
    (policy.can_manage_budgets, CHAT_OWNER, ("c1",), False),  # no llm:admin scope
    (policy.can_manage_budgets, ADMIN_TOKEN, ("c2",), True),
]


@pytest.mark.parametrize(
    ("check", "who", "args", "allowed"),
    TABLE,
    ids=[f"{c.__name__}-{w.role}-{w.company_id}-{'/'.join(map(str, a))}" for c, w, a, _ in TABLE],
)
def test_policy(check: F, who: Principal, args: tuple[Any, ...], allowed: bool) -> None:
    assert check(who, *args) is allowed


def test_every_policy_function_is_in_the_table() -> None:
    functions = {
        name
        for name in dir(policy)
        if name.startswith(("can_", "sees_")) and callable(getattr(policy, name))
    }
    assert functions == {check.__name__ for check, *_ in TABLE}


def test_ranks() -> None:
    assert policy.roles_at_or_below(MEMBER) == ("member",)
    assert policy.roles_at_or_below(OWNER) == ("member", "owner")
    assert policy.roles_at_or_below(ADMIN_TOKEN) == ("member", "owner", "admin")
    assert policy.roles_at_or_below(ROLELESS) == ()


def test_role_scopes() -> None:
    assert policy.scopes_for_role("member") == (SCOPE_SEND, SCOPE_READ)
    assert policy.scopes_for_role("owner") == EVERY_SCOPE == policy.scopes_for_role("admin")
    assert policy.scopes_for_role("unknown") == ()
