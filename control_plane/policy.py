"""Who may do what. Deny by default: every action has one function here that
returns True only for the principals it names, and handlers ask before acting.

Roles → scopes (DESIGN §9): member has ``llm:chat:send`` and ``llm:chat:read``;
owner and admin have all three, plus ``llm:admin``: every ``/v1/admin/…`` action
needs that scope on the principal, so an owner's API key narrowed to
``llm:chat:send`` is a chat key and nothing more. Logins and default API keys carry
all of the role's scopes; the admin token holds every scope.

``admin`` is the platform admin (as is the ``LLMGW_ADMIN_TOKEN`` principal, which
has no user or company); an ``owner`` manages its own company's users and API keys.

Nobody climbs: roles are ranked member < owner < admin, and no actor may mint keys
for, revoke, list the keys of, create, or lift a revocation made by anyone ranked
above itself. Without that rule an owner could mint an API key for an ``admin`` user
of its own company and act as the platform admin with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.tokens import ALL_SCOPES, SCOPE_DELETE, SCOPE_READ, SCOPE_SEND

# Control-plane only: stream tokens carry the chat scopes alone (`chat_init`).
SCOPE_ADMIN = "llm:admin"
ROLE_SCOPES: dict[str, tuple[str, ...]] = {
    "member": (SCOPE_SEND, SCOPE_READ),
    "owner": (*ALL_SCOPES, SCOPE_ADMIN),
    "admin": (*ALL_SCOPES, SCOPE_ADMIN),
}
ROLE_RANK: dict[str, int] = {"member": 0, "owner": 1, "admin": 2}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. `user_id`/`company_id` are None only for the admin token."""

    user_id: str | None
    company_id: str | None
    role: str
    scopes: frozenset[str]
    via: str  # "access_token" | "api_key" | "admin_token" | "external_jwt"
    api_key_id: str | None = None  # the key used, when `via` is "api_key" (budgets, usage)
    # The presented token's revocable id and expiry (epoch seconds), when it is a
    # signed-in token with one: an access token's jti, a trusted external JWT's
    # (`external_auth.external_token_id`). Logout revokes it; init signs it into the stream
    # token so that signing out ends the streams it opened too.
    token_id: str | None = None
    token_expires_at: int | None = None

    @property
    def is_user(self) -> bool:
        return self.user_id is not None and self.company_id is not None


def scopes_for_role(role: str) -> tuple[str, ...]:
    return ROLE_SCOPES.get(role, ())


def has_admin_scope(p: Principal) -> bool:
    return SCOPE_ADMIN in p.scopes


def is_platform_admin(p: Principal) -> bool:
    return p.role == "admin" and has_admin_scope(p)


def ranks_at_least(p: Principal, role: str) -> bool:
    """`p` is ranked at or above `role`. An unknown role of the caller ranks below
    everything and an unknown target role above everything: deny by default."""
    return ROLE_RANK.get(p.role, -1) >= ROLE_RANK.get(role, len(ROLE_RANK))


def roles_at_or_below(p: Principal) -> tuple[str, ...]:
    """The roles whose users (and their API keys) `p` may see and manage."""
    return tuple(role for role in ROLE_RANK if ranks_at_least(p, role))


def can_chat(p: Principal) -> bool:
    return p.is_user and SCOPE_SEND in p.scopes


def can_read_own_data(p: Principal) -> bool:
    """/v1/usage, /v1/credits, listing and reading sessions. Not /v1/me, which any
    user's credential reads (who it is, its company's credits, the budgets that cap
    it: what a send-only key needs to know before it sends)."""
    return p.is_user and SCOPE_READ in p.scopes


def sees_whole_company(p: Principal) -> bool:
    """An owner (or admin) sees its company's usage and sessions; a member its own."""
    return p.is_user and p.role in ("owner", "admin")


def can_read_session(
    p: Principal, owner_user_id: str, company_id: str, owner_role: str | None
) -> bool:
    """Its own user, or who sees the whole company, of a user ranked at or below it:
    an owner does not read the transcripts of an admin placed in its company.
    `owner_role` None (the user is gone) ranks above everyone (deny by default)."""
    if not can_read_own_data(p) or p.company_id != company_id:
        return False
    if p.user_id == owner_user_id:
        return True
    return sees_whole_company(p) and owner_role is not None and ranks_at_least(p, owner_role)


def can_delete_session(
    p: Principal, owner_user_id: str, company_id: str, owner_role: str | None
) -> bool:
    return SCOPE_DELETE in p.scopes and can_read_session(p, owner_user_id, company_id, owner_role)


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
    owner with the admin scope reads its own company's."""
    return can_admin_company(p, company_id) if company_id is not None else is_platform_admin(p)


def can_admin_company(p: Principal, company_id: str) -> bool:
    """Manage a company's users and API keys: the platform admin, or an owner of that
    company, either with the admin scope."""
    if is_platform_admin(p):
        return True
    return p.is_user and p.role == "owner" and has_admin_scope(p) and p.company_id == company_id


def can_manage_user(p: Principal, company_id: str, role: str) -> bool:
    """Mint API keys for, revoke or list the keys of one user of `company_id` whose
    role is `role`: an admin of the company, ranked at or above that user."""
    return can_admin_company(p, company_id) and ranks_at_least(p, role)


def promotion_voids_keys(previous: str, role: str) -> bool:
    """Whether a user moved from `previous` to `role` must lose its API keys: someone
    ranked below `role` may have minted them. A key's power follows its user's role
    as it is now (`auth.api_key_principal`), and a company's owner mints keys for any
    of its users ranked at or below itself (`can_manage_user`), so the lowest minter of
    a key of a `previous` user ranks as `previous` or as an owner, whichever is higher.
    Past that rank (an owner or a member made a platform admin), a key an owner minted
    for the user would carry the new rank: an owner's key for a co-owner, once the
    co-owner is promoted, is a platform admin's. Unknown roles: deny by default."""
    lowest_minter = max(ROLE_RANK.get(previous, -1), ROLE_RANK["owner"])
    return ROLE_RANK.get(role, len(ROLE_RANK)) > lowest_minter


def can_assign_role(p: Principal, role: str) -> bool:
    """Create a user with `role`: never above one's own, and admins only by an admin."""
    return ranks_at_least(p, role) and (role != "admin" or is_platform_admin(p))


def can_rotate_signing_keys(p: Principal) -> bool:
    return is_platform_admin(p)


def can_revoke(p: Principal, kind: str, company_id: str, target_role: str | None) -> bool:
    """The platform admin revokes anything; an owner its own company's users and
    stream tokens, but not its company (that would lock itself out for good), and
    only those of users ranked at or below it (`target_role`: the user's role, or the
    role of the user a stream token was minted for; None when unknown)."""
    if is_platform_admin(p):
        return True
    return (
        kind in ("user", "jti")
        and target_role is not None
        and can_manage_user(p, company_id, target_role)
    )


def can_lift_revocation(
    p: Principal, kind: str, company_id: str, target_role: str | None, revoker_role: str
) -> bool:
    """Lift a revocation: who could make it, and only if whoever made it
    (`revoker_role`) is not ranked above the caller: an owner never undoes the
    platform admin's decision."""
    return can_revoke(p, kind, company_id, target_role) and ranks_at_least(p, revoker_role)


def can_list_companies(p: Principal) -> bool:
    return is_platform_admin(p)


def can_configure_llm(p: Principal, company_id: str) -> bool:
    """Store provider keys, set the default model, add or override models."""
    return can_admin_company(p, company_id)


def can_rotate_encryption(p: Principal) -> bool:
    return is_platform_admin(p)


def can_manage_agents(p: Principal, company_id: str) -> bool:
    """Create, change, delete or read the full definition of a company's agents (its
    system prompts and tools): the platform admin, or an owner of that company."""
    return can_admin_company(p, company_id)


def can_use_agents(p: Principal, company_id: str) -> bool:
    """List and chat with a company's agents: any of its users who may chat."""
    return can_chat(p) and p.company_id == company_id


def can_manage_budgets(p: Principal, company_id: str) -> bool:
    """Budgets, teams and the company's webhook: an admin of the company (an owner
    with the admin scope, or the platform admin). Each target is further checked
    with `ranks_at_least`: nobody budgets a user ranked above itself."""
    return can_admin_company(p, company_id)
