"""Companies, users and API keys: the admin use cases. Each runs in one
transaction and checks its policy there, against the rows it is about to touch."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import company_locks, owners, policy
from control_plane.audit import ADMIN_TOKEN_ACTOR
from control_plane.credentials import new_api_key
from control_plane.emails import canonical_email
from control_plane.errors import Conflict, Forbidden, NotFound, ValidationFailed
from control_plane.grants import move
from control_plane.pagination import Page, PageRequest, read_page
from control_plane.policy import Principal
from control_plane.tables import ApiKey, Company, Reservation, User, iso, new_id, utcnow
from shared.pricing import format_credits

# The addresses users of a trusted external app get when their token carries no
# verified email (`external_auth`): an `.invalid` domain (RFC 2606), reserved for them.
EXTERNAL_EMAIL_DOMAIN = "external.invalid"


def actor_of(p: Principal) -> str:
    """Who a money movement is attributed to in the ledger and the audit log."""
    return p.user_id or ADMIN_TOKEN_ACTOR


def find_user_by_email(session: Session, email: str) -> User | None:
    return session.scalars(select(User).where(col(User.email) == email)).first()


def find_user_signing_in(session: Session, typed: str) -> User | None:
    """The user whose address `typed` spells (`emails.canonical_email`). An address
    stored before spellings were made one, in a form not canonical, is found by the
    spelling it was stored with (lowercased, as it was then), only when no account
    has the canonical one."""
    user = find_user_by_email(session, canonical_email(typed))
    legacy = typed.strip().lower()
    if user is None and legacy != canonical_email(typed):
        user = find_user_by_email(session, legacy)
    return user


def company_public(company: Company) -> dict[str, Any]:
    return {
        "id": company.id,
        "name": company.name,
        "credits": format_credits(company.balance_micro),
    }


def create_company(
    session: Session, p: Principal, name: str, credits_micro: int, request_id: str
) -> Company:
    if not policy.can_create_company(p):
        raise Forbidden("Only a platform admin can create companies.")
    if session.scalars(select(Company).where(col(Company.name) == name)).first() is not None:
        raise Conflict(f"A company named {name!r} already exists.")
    company = Company(
        id=new_id(),
        name=name,
        balance_micro=0,
        held_micro=0,
        default_model=None,
        created_at=utcnow(),
    )
    session.add(company)
    session.flush()
    if credits_micro > 0:
        move(
            session,
            company.id,
            credits_micro,
            kind="grant",
            reason="initial credits",
            actor=actor_of(p),
            request_id=request_id,
        )
        session.refresh(company)
    return company


def list_companies(session: Session, p: Principal, req: PageRequest) -> Page[Company]:
    """Every company, newest first (platform admin only)."""
    if not policy.can_list_companies(p):
        raise Forbidden("Only a platform admin can list companies.")
    return read_page(session, select(Company), col(Company.created_at), col(Company.id), req)


def user_public(user: User) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "role": user.role, "company_id": user.company_id}


def user_listed(user: User) -> dict[str, Any]:
    """A user in a listing: no password hash, only whether a password is set."""
    return {
        **user_public(user),
        "has_password": user.password_hash is not None,
        "created_at": iso(user.created_at),
        "disabled_at": iso(user.disabled_at) if user.disabled_at else None,
    }


def list_users(session: Session, p: Principal, company_id: str, req: PageRequest) -> Page[User]:
    """A company's users ranked at or below the caller, newest first: an owner never
    learns who the company's platform admins are."""
    if not policy.can_admin_company(p, company_id):
        raise NotFound("No such company.")
    stmt = (
        select(User)
        .where(col(User.company_id) == company_id)
        .where(col(User.role).in_(policy.roles_at_or_below(p)))
    )
    return read_page(session, stmt, col(User.created_at), col(User.id), req)


# An owner's users, at most: each user may then hold its own keys, sessions and
# pending inits, and nothing else bounded how many an owner's script created (~150 a
# second from one client, a user and an audit row each: ~15 GB a day). 100,000 is
# past any company managing its people here by hand or script (~120 MB of rows); a
# larger workforce signs in through the external identity provider, which provisions
# its users without this bound, as the platform admin creates them.
USERS_PER_COMPANY_MAX = 100_000


def _check_room_for_a_user(session: Session, company_id: str) -> None:
    """409 when the company already has `USERS_PER_COMPANY_MAX` users. Counted under
    the company's row lock (`owners`' lock, the order of init and budgets), so two
    creations at once cannot both take the last place."""
    session.execute(select(col(Company.id)).where(col(Company.id) == company_id).with_for_update())
    users = session.scalar(
        select(func.count()).select_from(User).where(col(User.company_id) == company_id)
    )
    if (users or 0) >= USERS_PER_COMPANY_MAX:
        raise Conflict(
            f"A company keeps at most {USERS_PER_COMPANY_MAX} users; "
            "the platform's administrator can add more."
        )


def create_user(
    session: Session,
    p: Principal,
    *,
    company_id: str,
    email: str,
    password_hash: str | None,
    role: str,
) -> User:
    if not policy.can_admin_company(p, company_id):
        raise Forbidden("You cannot add users to this company.")
    if not policy.can_assign_role(p, role):
        raise Forbidden(f"You cannot create a user with role {role}: only a platform admin can.")
    if session.get(Company, company_id) is None:
        raise NotFound("No such company.")
    if not policy.is_platform_admin(p):
        _check_room_for_a_user(session, company_id)
    if email.endswith("@" + EXTERNAL_EMAIL_DOMAIN):
        # An owner taking the address an external user of any company is given at
        # first sight made that user's every token fail on the unique email.
        raise ValidationFailed("email", f"@{EXTERNAL_EMAIL_DOMAIN} is reserved for external users")
    if find_user_by_email(session, email) is not None:
        raise Conflict("A user with this email already exists.")
    user = User(
        id=new_id(),
        company_id=company_id,
        email=email,
        password_hash=password_hash,
        role=role,
        created_at=utcnow(),
    )
    session.add(user)
    session.flush()
    return user


@dataclass(frozen=True, slots=True)
class RoleChange:
    """A user whose role was set, the role it had, and what a promotion past what an
    owner may mint for (`policy.promotion_voids_keys`) ended: the API keys revoked,
    each with its listing as it was before, and whether the user had a password."""

    user: User
    previous: str
    voided: list[tuple[ApiKey, dict[str, Any]]]
    credentials_ended: bool = False
    had_password: bool = False


def set_role(
    session: Session,
    p: Principal,
    user_id: str,
    role: str,
    new_password_hash: str | None = None,
) -> RoleChange:
    """Change a user's role (`RoleChange`). Nobody climbs:
    the caller must manage the user as it is now (ranked at or above it) and may give
    only a role it could create. Nobody changes its own role (an owner demoting
    itself could leave the company without one), and the company's owners never
    demote its last one between them (`owners`: the role is read, and the owners
    counted, under the company's row lock). Keys follow at once: a key's scopes are
    cut to its user's role on every request (`auth.user_principal`). That works both
    ways, so a promotion past what an owner may mint for revokes the user's keys
    (`policy.promotion_voids_keys`): an owner's key for a colleague must not become a
    platform admin's when the platform promotes that colleague. Nor its password,
    which whoever created the user chose (an owner knows it), nor a sign-in made with
    it: the password goes (`new_password_hash` replaces it: the platform admin's
    choice) and every sign-in of the user ends (`User.sign_in_epoch`). A password is
    given only with such a promotion (422 otherwise)."""
    user = session.get(User, user_id)
    if user is None or not policy.can_manage_user(p, user.company_id, user.role):
        raise NotFound("No such user.")
    if user.id == p.user_id:
        raise Forbidden("You cannot change your own role.")
    if not policy.can_assign_role(p, role):
        raise Forbidden(f"You cannot give the role {role}: only a platform admin can.")
    owners.lock_company(session, user.company_id)
    session.refresh(user)  # as it is now that changes to the company's owners queue
    if not policy.can_manage_user(p, user.company_id, user.role):
        raise NotFound("No such user.")
    if user.role == "owner" and role != "owner":
        owners.keep_an_owner(session, p, user.company_id, user.id)
    previous = user.role
    ends_credentials = policy.promotion_voids_keys(previous, role)
    if new_password_hash is not None and not ends_credentials:
        raise ValidationFailed("password", "is set only with a promotion to admin")
    had_password = user.password_hash is not None
    user.role = role
    if ends_credentials:
        user.password_hash = new_password_hash
        user.sign_in_epoch += 1
    session.flush()
    if not ends_credentials:
        return RoleChange(user, previous, [])
    voided = revoke_live_keys(session, user.id)
    return RoleChange(user, previous, voided, credentials_ended=True, had_password=had_password)


def revoke_live_keys(session: Session, user_id: str) -> list[tuple[ApiKey, dict[str, Any]]]:
    """Revoke every live API key of `user_id`: the rows, each with its listing as it
    was before. At most `API_KEYS_PER_USER_MAX` for a key an owner minted."""
    rows = list(
        session.scalars(
            select(ApiKey)
            .where(col(ApiKey.user_id) == user_id)
            .where(col(ApiKey.revoked_at).is_(None))
            .with_for_update()
        )
    )
    before = [api_key_public(row) for row in rows]
    now = utcnow()
    for row in rows:
        row.revoked_at = now
    session.flush()
    return list(zip(rows, before, strict=True))


@dataclass(frozen=True, slots=True)
class CreatedKey:
    id: str
    key: str
    prefix: str
    scopes: list[str]

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "key": self.key, "prefix": self.prefix, "scopes": self.scopes}


def key_scopes(requested: Any, role: str, held: Collection[str]) -> list[str]:
    """The scopes a new key gets: a non-empty subset of its user's role scopes that
    the creator itself holds (`held`), default all of those. A key can never carry
    more power than the principal that minted it (a narrowed key mints narrow keys)."""
    allowed = policy.scopes_for_role(role)
    if requested is None:
        granted = [s for s in allowed if s in held]
        if not granted:
            raise Forbidden("You hold none of the scopes this user's key could carry.")
        return granted
    if (
        not isinstance(requested, list)
        or not requested
        or not all(isinstance(s, str) for s in requested)
    ):
        raise ValidationFailed("scopes", "must be a non-empty array of scope strings")
    extra = sorted(set(requested) - set(allowed))
    if extra:
        raise ValidationFailed(
            "scopes", f"{', '.join(extra)} not allowed for role {role} ({', '.join(allowed)})"
        )
    beyond = sorted(set(requested) - set(held))
    if beyond:
        raise Forbidden(f"You cannot grant scopes you do not hold: {', '.join(beyond)}.")
    return [s for s in allowed if s in requested]


# Live (unrevoked) API keys an owner may mint, per user and per company: nothing
# bounded them, and an owner's script minted ~55-80 a second from one client (a key
# row and an audit row each, ~0.75 KB: ~5 GB a day), kept until revoked. 100 a user
# is past one key per service, environment and colleague's laptop; 10,000 a company
# past any company handing keys to its own services (its people sign in). A revoked
# key frees its place; the platform admin is not bound, and can mint more.
API_KEYS_PER_USER_MAX = 100
API_KEYS_PER_COMPANY_MAX = 10_000


def _live_keys(session: Session, company_id: str, user_id: str | None, cap: int) -> int:
    """The live keys of `user_id` (or of the whole company), counted up to `cap`: a
    company's count stops there rather than reading every key it holds."""
    stmt = select(col(ApiKey.id)).where(col(ApiKey.revoked_at).is_(None))
    if user_id is not None:
        stmt = stmt.where(col(ApiKey.user_id) == user_id)
    else:
        stmt = stmt.join(User, col(User.id) == col(ApiKey.user_id)).where(
            col(User.company_id) == company_id
        )
    return session.scalar(select(func.count()).select_from(stmt.limit(cap).subquery())) or 0


def _check_room_for_a_key(session: Session, company_id: str, user_id: str) -> None:
    """409 when the user already has `API_KEYS_PER_USER_MAX` live keys, or the company
    `API_KEYS_PER_COMPANY_MAX`. Counted under the company's configuration lock (not
    its row, which every init updates), so two mints at once cannot both take the
    last place."""
    company_locks.hold_configuration(session, company_id)
    if _live_keys(session, company_id, user_id, API_KEYS_PER_USER_MAX) >= API_KEYS_PER_USER_MAX:
        raise Conflict(
            f"A user keeps at most {API_KEYS_PER_USER_MAX} API keys; revoke one it no longer uses."
        )
    if _live_keys(session, company_id, None, API_KEYS_PER_COMPANY_MAX) >= API_KEYS_PER_COMPANY_MAX:
        raise Conflict(
            f"A company keeps at most {API_KEYS_PER_COMPANY_MAX} API keys; revoke those "
            "no longer used, or ask the platform's administrator."
        )


def create_api_key(session: Session, p: Principal, user_id: str, scopes: Any) -> CreatedKey:
    """A key for `user_id` (`key_scopes`). The user's role is read again under its
    row's lock (after the company's configuration lock: `company_locks`' order), so
    a promotion committing meanwhile either comes first, and is seen (404 for a
    caller now ranked below the user), or waits for this key and revokes it
    (`set_role`): a key read at the user's old rank never outlives a promotion.
    The company's row is queued on first (`owners.queue_behind_company_lock`), as a
    promotion locks it before the user's: holding the user's row, the key's audit
    row (a foreign key to the company) waited for a promotion that waited for the
    user's row, a deadlock PostgreSQL broke with a 503."""
    user = session.get(User, user_id)
    if user is None or not policy.can_manage_user(p, user.company_id, user.role):
        raise NotFound("No such user.")
    key_scopes(scopes, user.role, p.scopes)  # a bad request is refused before any lock
    if not policy.is_platform_admin(p):
        _check_room_for_a_key(session, user.company_id, user.id)
    owners.queue_behind_company_lock(session, user.company_id)
    role = session.execute(
        select(col(User.role)).where(col(User.id) == user.id).with_for_update(key_share=True)
    ).scalar()
    if role is None or not policy.can_manage_user(p, user.company_id, role):
        raise NotFound("No such user.")
    granted = key_scopes(scopes, role, p.scopes)
    new = new_api_key()
    row = ApiKey(
        id=new_id(),
        user_id=user.id,
        prefix=new.prefix,
        key_hash=new.key_hash,
        scopes=orjson.dumps(granted).decode(),
        created_at=utcnow(),
        revoked_at=None,
        last_used_at=None,
    )
    session.add(row)
    session.flush()
    return CreatedKey(id=row.id, key=new.key, prefix=new.prefix, scopes=granted)


def revoke_api_key(session: Session, p: Principal, key_id: str) -> None:
    row = session.execute(
        select(ApiKey, User)
        .join(User, col(User.id) == col(ApiKey.user_id))
        .where(col(ApiKey.id) == key_id)
    ).first()
    if row is None:
        raise NotFound("No such API key.")
    _, user = row
    if not policy.can_manage_user(p, user.company_id, user.role):
        raise NotFound("No such API key.")
    # Before the key's row, as a promotion (which revokes the user's keys) locks the
    # company, then the user, then the keys: holding the key's row, this revocation's
    # audit row (a foreign key to the company) waited for a promotion that waited for
    # the key's row, a deadlock PostgreSQL broke with a 503. The rank is then read
    # again: a promotion that went first is seen.
    owners.queue_behind_company_lock(session, user.company_id)
    session.refresh(user)
    if not policy.can_manage_user(p, user.company_id, user.role):
        raise NotFound("No such API key.")
    # Already revoked: revoking again is a no-op.
    session.execute(
        update(ApiKey)
        .where(col(ApiKey.id) == key_id)
        .where(col(ApiKey.revoked_at).is_(None))
        .values(revoked_at=utcnow())
    )


def open_stream_ids(session: Session, company_id: str, key_id: str) -> list[str]:
    """The `jti`s of the stream tokens `key_id` minted whose holds are still active:
    not yet used, or streaming (a settled one's stream has ended). Read by the
    active holds' index, which only the company's open streams fill."""
    return list(
        session.scalars(
            select(col(Reservation.jti)).where(
                col(Reservation.status) == "active",
                col(Reservation.company_id) == company_id,
                col(Reservation.api_key_id) == key_id,
            )
        )
    )


def api_key_public(row: ApiKey) -> dict[str, Any]:
    """What a listing shows: the prefix, never the key or its hash."""
    return {
        "id": row.id,
        "user_id": row.user_id,
        "prefix": row.prefix,
        "scopes": orjson.loads(row.scopes),
        "created_at": iso(row.created_at),
        "last_used_at": iso(row.last_used_at) if row.last_used_at else None,
        "revoked_at": iso(row.revoked_at) if row.revoked_at else None,
    }


def list_api_keys(
    session: Session,
    p: Principal,
    *,
    user_id: str | None,
    company_id: str | None,
    req: PageRequest,
) -> Page[ApiKey]:
    """A user's or a company's API keys, newest first (platform admin: any; owner: its
    company's, except those of users ranked above it)."""
    if user_id is not None:
        user = session.get(User, user_id)
        if user is None or not policy.can_manage_user(p, user.company_id, user.role):
            raise NotFound("No such user.")
        company_id = user.company_id
    if company_id is None:
        if not policy.is_platform_admin(p) or p.company_id is not None:
            company_id = p.company_id
    if company_id is not None and not policy.can_admin_company(p, company_id):
        raise NotFound("No such company.")
    if company_id is None and not policy.is_platform_admin(p):
        raise Forbidden("Only a platform admin can list every API key.")
    stmt = (
        select(ApiKey)
        .join(User, col(User.id) == col(ApiKey.user_id))
        .where(col(User.role).in_(policy.roles_at_or_below(p)))
    )
    if user_id is not None:
        stmt = stmt.where(col(ApiKey.user_id) == user_id)
    elif company_id is not None:
        stmt = stmt.where(col(User.company_id) == company_id)
    return read_page(session, stmt, col(ApiKey.created_at), col(ApiKey.id), req)
