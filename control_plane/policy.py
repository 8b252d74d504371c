"""Who may do what. Deny by default: every action has one function here that
returns True only for the principals it names, and handlers ask before acting.

Roles → scopes (DESIGN §9): member has ``llm:chat:send`` and ``llm:chat:read``;
owner and admin have all three. ``admin`` is the platform admin (as is the
``LLMGW_ADMIN_TOKEN`` principal, which has no user or company); an ``owner``
manages its own company's users and API keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.tokens import ALL_SCOPES, SCOPE_DELETE, SCOPE_READ, SCOPE_SEND

ROLE_SCOPES: dict[str, tuple[str, ...]] = {
    "member": (SCOPE_SEND, SCOPE_READ),
    "owner": ALL_SCOPES,
    "admin": ALL_SCOPES,
}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. `user_id`/`company_id` are None only for the admin token."""

    user_id: str | None
    company_id: str | None
    role: str
    scopes: frozenset[str]
    via: str  # "access_token" | "api_key" | "admin_token" | "external_jwt"

    @property
    def is_user(self) -> bool:
        return self.user_id is not None and self.company_id is not None


def scopes_for_role(role: str) -> tuple[str, ...]:
    return ROLE_SCOPES.get(role, ())


def is_platform_admin(p: Principal) -> bool:
    return p.role == "admin"


def can_chat(p: Principal) -> bool:
    return p.is_user and SCOPE_SEND in p.scopes


def can_read_own_data(p: Principal) -> bool:
    """/v1/me, /v1/usage, /v1/credits, listing sessions."""
    return p.is_user and SCOPE_READ in p.scopes


def sees_whole_company(p: Principal) -> bool:
    """An owner (or admin) sees its company's usage and sessions; a member its own."""
    return p.is_user and p.role in ("owner", "admin")


def can_read_session(p: Principal, owner_user_id: str, company_id: str) -> bool:
    if not can_read_own_data(p) or p.company_id != company_id:
        return False
    return p.user_id == owner_user_id or sees_whole_company(p)


def can_delete_session(p: Principal, owner_user_id: str, company_id: str) -> bool:
    return SCOPE_DELETE in p.scopes and can_read_session(p, owner_user_id, company_id)


def can_use_session(p: Principal, owner_user_id: str, company_id: str) -> bool:
    """Appending a turn to a session: only its own user."""
    return can_chat(p) and p.company_id == company_id and p.user_id == owner_user_id


def can_create_company(p: Principal) -> bool:
    return is_platform_admin(p)


def can_grant_credits(p: Principal, company_id: str) -> bool:
    # Money is platform-only: an owner granting its own company credits would mint them.
    return is_platform_admin(p)


def can_adjust_credits(p: Principal, company_id: str) -> bool:
    return is_platform_admin(p)


def can_read_audit(p: Principal, company_id: str | None) -> bool:
    """The platform admin reads any company's audit log (or all of them, `None`); an
    owner reads its own company's."""
    if is_platform_admin(p):
        return True
    return p.is_user and p.role == "owner" and company_id == p.company_id


def can_admin_company(p: Principal, company_id: str) -> bool:
    """Manage a company's users and API keys."""
    return is_platform_admin(p) or (p.role == "owner" and p.company_id == company_id)


def can_assign_role(p: Principal, role: str) -> bool:
    return role != "admin" or is_platform_admin(p)


def can_rotate_signing_keys(p: Principal) -> bool:
    return is_platform_admin(p)


def can_revoke(p: Principal, kind: str, company_id: str) -> bool:
    """The platform admin revokes anything; an owner its own company's users and
    stream tokens, but not its company (that would lock itself out for good)."""
    if is_platform_admin(p):
        return True
    return p.role == "owner" and p.company_id == company_id and kind in ("user", "jti")


def can_configure_llm(p: Principal, company_id: str) -> bool:
    """Store provider keys, set the default model, add or override models."""
    return can_admin_company(p, company_id)


def can_rotate_encryption(p: Principal) -> bool:
    return is_platform_admin(p)
