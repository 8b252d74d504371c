"""Every route of the control plane, attacked with the real ids of a company's things.

One control plane (uvicorn, SQLite + in-memory store) for the module. Company A holds
one of each thing a company owns: users, API keys, chat sessions with their messages,
reservations and usage, an agent, a budget, a team, a threshold webhook, a provider
key, a revocation, audit events. The attackers:

* ``other_owner``: a signed-in owner of company B;
* ``external``: a trusted external JWT whose claims name A's own id as its company,
  with ``role: admin`` and every scope (another app must never mint A's owner, nor a
  platform admin);
* ``member``: a signed-in member of A;
* ``send_key``: an API key of A's owner narrowed to ``llm:chat:send``;
* ``demoted`` and ``demoted_key``: the access token and the default API key (minted
  with every scope of an owner, ``llm:admin`` included) of an owner of A demoted to
  member since;
* the dead: ``signed_out`` (an access token of A's owner after
  ``POST /v1/auth/logout``), ``signed_out_external`` (a trusted external JWT of an
  owner, signed out), ``revoked_key`` (an API key of A's owner, revoked): 401 on
  every route.

The routes come from the app itself (`ROUTES` must name every one, so a route added
later fails `test_every_route_is_swept` until it is swept or said to take no id).
Each attack must be refused (401/403/404, as `Spec.refused` says) and leave every
database row and every store key as it was; a listing the attacker may call must not
show a single id of the things it may not see. The same attacks made by who may
make them (A's owner or user, the platform admin) are served, on a world of their
own (`test_each_attack_is_served_to_its_rightful_caller`): no refusal above comes
from a request nobody could make.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from argon2 import PasswordHasher
from sqlalchemy import create_engine, inspect, text
from starlette.routing import Route

from control_plane.app import create_app
from control_plane.deps import Deps
from shared.tokens import ALL_SCOPES
from tests.test_control_plane import (
    ADMIN_TOKEN,
    CP,
    PASSWORD,
    _settings,
    data_of,
    serve_cp,
    usage_event,
)
from tests.token_claims import jti_of

SECRET = "an-existing-apps-hs256-secret-of-32-bytes+"
AUDIENCE = "llm-gateway-users"
ISSUER = "https://idp.example/"
EVERY_SCOPE = [*ALL_SCOPES, "llm:admin"]

DEAD = {"signed_out": "signed_out", "signed_out_external": "signed_out", "revoked_key": None}
MEMBERS = ("member", "send_key", "demoted", "demoted_key")
OUTSIDERS = ("other_owner", "external")
ACTORS = (*OUTSIDERS, *MEMBERS, *DEAD)
BELOW_OWNER = (*MEMBERS, *DEAD)
DENIED = frozenset({401, 403, 404})

# Routes that take no id of a company's thing, and why (each is attacked elsewhere).
NO_ID: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): "public",
    ("GET", "/readyz"): "public",
    ("GET", "/metrics"): "public, no tenant label (test_ops_metrics.py)",
    ("GET", "/.well-known/jwks.json"): "public keys",
    ("GET", "/openapi.json"): "public",
    ("POST", "/v1/auth/login"): "email and password (test_identity_login_limits.py)",
    ("POST", "/v1/auth/logout"): "ends the caller's own token only (test_identity_logout.py)",
    ("POST", "/v1/webhooks/usage"): "signed by the webhook secret, no principal",
    ("POST", "/v1/internal/chat/init"): "the edges' service token (test_key_callers.py)",
    ("POST", "/v1/internal/models"): "the edges' service token (test_key_callers.py)",
    ("GET", "/"): "static page",
    ("GET", "/console"): "static page",
    ("GET", "/console/"): "static page",
    ("GET", "/console/{name:path}"): "static files (test_console_api.py)",
}


@dataclass(frozen=True)
class Spec:
    """One attack on a route: path values, query and body may name ``{ids}`` of the
    world (`World.ids`, plus the attacker's own ``{self}`` and ``{self_company}``).
    `actors`: who makes it (default all); `listing`: a read the actor may make,
    which must then show none of the ids it may not see; `refused`: the answers
    that count as a refusal."""

    path: str
    query: dict[str, str] = field(default_factory=dict)
    body: Any = None
    actors: tuple[str, ...] = ACTORS
    # Who may make it (served 2xx): a refusal is then about the caller, never about
    # a request nobody could make. None: the attacker's own ids, or a listing.
    rightful: str | None = "platform"
    listing: bool = False
    refused: frozenset[int] = DENIED
    headers: dict[str, str] = field(default_factory=dict)


def _spec(path: str, **kw: Any) -> Spec:
    return Spec(path, **kw)


A = "{company}"
LISTING_QUERY = {"company_id": A, "user_id": "{member2}"}
ROUTES: dict[tuple[str, str], list[Spec]] = {
    ("GET", "/v1/me"): [_spec("/v1/me", query=LISTING_QUERY, listing=True)],
    ("GET", "/v1/models"): [_spec("/v1/models", query=LISTING_QUERY, listing=True)],
    ("GET", "/v1/agents"): [_spec("/v1/agents", query=LISTING_QUERY, listing=True)],
    ("GET", "/v1/sessions"): [_spec("/v1/sessions", query=LISTING_QUERY, listing=True)],
    ("GET", "/v1/usage"): [_spec("/v1/usage", query=LISTING_QUERY, listing=True)],
    ("GET", "/v1/credits"): [_spec("/v1/credits", query=LISTING_QUERY, listing=True)],
    ("GET", "/v1/usage/summary"): [
        _spec(
            "/v1/usage/summary",
            query={"company_id": A, "group_by": "day,model,user"},
            listing=True,
        )
    ],
    ("GET", "/v1/usage/ttft"): [_spec("/v1/usage/ttft", query={"company_id": A}, listing=True)],
    ("GET", "/v1/sessions/{session_id}"): [
        _spec("/v1/sessions/{session_member2}", rightful="owner"),
        _spec("/v1/sessions/{session_owner}", rightful="owner"),
    ],
    ("DELETE", "/v1/sessions/{session_id}"): [
        _spec("/v1/sessions/{session_member2}", rightful="owner"),
        _spec("/v1/sessions/{session_owner}", rightful="owner"),
    ],
    ("POST", "/v1/chat/init"): [
        _spec(
            "/v1/chat/init",
            body={"session_id": "{session_member2}", "query": "hi"},
            rightful="member2",
        ),
        _spec(
            "/v1/chat/init",
            body={"session_id": "{session_owner}", "query": "hi"},
            rightful="owner",
            actors=tuple(a for a in ACTORS if a != "send_key"),  # the owner's own key
        ),
        _spec(
            "/v1/chat/init",
            body={"agent": "{agent}", "query": "hi"},
            rightful="member2",
            actors=(*OUTSIDERS, "signed_out"),
            # B has no agent of that name (404); the external company has no credits.
            refused=DENIED | {402},
        ),
    ],
    ("POST", "/v1/admin/companies"): [
        _spec("/v1/admin/companies", body={"name": "climb-{uniq}", "credits": "1000"})
    ],
    ("GET", "/v1/admin/companies"): [
        _spec("/v1/admin/companies", query=LISTING_QUERY, listing=True)
    ],
    ("POST", "/v1/admin/users"): [
        _spec(
            "/v1/admin/users",
            body={"company_id": A, "email": "a-{uniq}@example.com", "role": "member"},
        ),
        _spec(
            "/v1/admin/users",
            body={
                "company_id": A,
                "email": "b-{uniq}@example.com",
                "role": "owner",
                "password": PASSWORD,
            },
        ),
        # Its own company, a rank it does not hold (an owner minting a platform admin).
        _spec(
            "/v1/admin/users",
            body={"company_id": "{self_company}", "email": "c-{uniq}@example.com", "role": "admin"},
        ),
        _spec(
            "/v1/admin/users",
            body={"company_id": "{self_company}", "email": "d-{uniq}@example.com", "role": "owner"},
            actors=BELOW_OWNER,
        ),
    ],
    ("GET", "/v1/admin/users"): [_spec("/v1/admin/users", query=LISTING_QUERY, listing=True)],
    ("PATCH", "/v1/admin/users/{user_id}"): [
        _spec("/v1/admin/users/{member2}", body={"role": "owner"}),
        _spec("/v1/admin/users/{owner}", body={"role": "member"}),
        _spec("/v1/admin/users/{self}", body={"role": "admin"}),
        _spec(
            "/v1/admin/users/{self}",
            body={"role": "owner"},
            actors=BELOW_OWNER,
        ),
    ],
    ("POST", "/v1/admin/api-keys"): [
        _spec("/v1/admin/api-keys", body={"user_id": "{member2}"}),
        _spec("/v1/admin/api-keys", body={"user_id": "{owner}", "scopes": EVERY_SCOPE}),
        _spec("/v1/admin/api-keys", body={"user_id": "{admin_user}"}),
        # A key for itself, wider than what it holds (or than any scope there is).
        _spec(
            "/v1/admin/api-keys",
            body={"user_id": "{self}", "scopes": EVERY_SCOPE},
            actors=BELOW_OWNER,
        ),
        _spec(
            "/v1/admin/api-keys",
            body={"user_id": "{self}", "scopes": [*EVERY_SCOPE, "admin", "llm:platform"]},
            refused=DENIED | {422},
        ),
    ],
    ("GET", "/v1/admin/api-keys"): [
        _spec("/v1/admin/api-keys", query={"user_id": "{member2}"}, listing=True),
        _spec("/v1/admin/api-keys", query={"company_id": A}, listing=True),
    ],
    ("DELETE", "/v1/admin/api-keys/{key_id}"): [
        _spec("/v1/admin/api-keys/{key_member2}"),
        _spec("/v1/admin/api-keys/{key_owner}"),
    ],
    ("POST", "/v1/admin/signing-keys/rotate"): [
        _spec("/v1/admin/signing-keys/rotate", body={"retire_others": True})
    ],
    ("GET", "/v1/admin/companies/{company_id}/budgets"): [
        _spec(f"/v1/admin/companies/{A}/budgets")
    ],
    ("POST", "/v1/admin/companies/{company_id}/budgets"): [
        _spec(
            f"/v1/admin/companies/{A}/budgets",
            body={"scope": "user", "target_id": "{member}", "amount": "1", "period": "week"},
        ),
        # A budget of its own company aimed at A's member, key or team.
        *(
            _spec(
                "/v1/admin/companies/{self_company}/budgets",
                body={"scope": scope, "target_id": target, "amount": "1", "period": "none"},
                actors=OUTSIDERS,
                refused=DENIED | {422},
            )
            for scope, target in (
                ("user", "{member2}"),
                ("api_key", "{key_member2}"),
                ("team", "{team}"),
            )
        ),
    ],
    ("PATCH", "/v1/admin/companies/{company_id}/budgets/{budget_id}"): [
        _spec(f"/v1/admin/companies/{A}/budgets/{{budget}}", body={"amount": "1000"}),
        # The id in the attacker's own company's path: the budget must not move.
        _spec(
            "/v1/admin/companies/{self_company}/budgets/{budget}",
            body={"amount": "1000"},
            actors=OUTSIDERS,
        ),
    ],
    ("DELETE", "/v1/admin/companies/{company_id}/budgets/{budget_id}"): [
        _spec(f"/v1/admin/companies/{A}/budgets/{{budget}}"),
        _spec("/v1/admin/companies/{self_company}/budgets/{budget}", actors=OUTSIDERS),
    ],
    ("GET", "/v1/admin/companies/{company_id}/teams"): [_spec(f"/v1/admin/companies/{A}/teams")],
    ("POST", "/v1/admin/companies/{company_id}/teams"): [
        _spec(f"/v1/admin/companies/{A}/teams", body={"name": "t-{uniq}", "user_ids": []}),
        # A team of its own holding A's member: A's member must not join it.
        _spec(
            "/v1/admin/companies/{self_company}/teams",
            body={"name": "t-{uniq}", "user_ids": ["{member2}"]},
            actors=OUTSIDERS,
            refused=DENIED | {422},
        ),
    ],
    ("PATCH", "/v1/admin/companies/{company_id}/teams/{team_id}"): [
        _spec(f"/v1/admin/companies/{A}/teams/{{team}}", body={"user_ids": []}),
        _spec(
            "/v1/admin/companies/{self_company}/teams/{team}",
            body={"name": "mine"},
            actors=OUTSIDERS,
        ),
    ],
    ("DELETE", "/v1/admin/companies/{company_id}/teams/{team_id}"): [
        _spec(f"/v1/admin/companies/{A}/teams/{{team}}"),
        _spec("/v1/admin/companies/{self_company}/teams/{team}", actors=OUTSIDERS),
    ],
    ("GET", "/v1/admin/companies/{company_id}/webhook"): [
        _spec(f"/v1/admin/companies/{A}/webhook")
    ],
    ("PUT", "/v1/admin/companies/{company_id}/webhook"): [
        _spec(f"/v1/admin/companies/{A}/webhook", body={"url": "https://93.184.216.34/stolen"})
    ],
    ("DELETE", "/v1/admin/companies/{company_id}/webhook"): [
        _spec(f"/v1/admin/companies/{A}/webhook")
    ],
    ("POST", "/v1/admin/companies/{company_id}/credits"): [
        _spec(
            f"/v1/admin/companies/{A}/credits",
            body={"amount": "1000", "reason": "climb"},
            headers={"Idempotency-Key": "{uniq}"},
        ),
        _spec(
            "/v1/admin/companies/{self_company}/credits",
            body={"amount": "1000", "reason": "climb"},
            actors=(*OUTSIDERS, "member", "demoted_key"),
        ),
    ],
    ("POST", "/v1/admin/companies/{company_id}/adjustments"): [
        _spec(f"/v1/admin/companies/{A}/adjustments", body={"amount": "-1", "reason": "x"}),
        _spec(
            "/v1/admin/companies/{self_company}/adjustments",
            body={"amount": "1000", "reason": "climb"},
            actors=(*OUTSIDERS, "member", "demoted_key"),
        ),
    ],
    ("GET", "/v1/admin/audit"): [
        _spec("/v1/admin/audit", query={"company_id": A}),
        _spec("/v1/admin/audit", query={"target": "{member2}"}, listing=True),
    ],
    ("GET", "/v1/admin/companies/{company_id}/providers"): [
        _spec(f"/v1/admin/companies/{A}/providers")
    ],
    ("PUT", "/v1/admin/companies/{company_id}/providers/{provider}"): [
        _spec(
            f"/v1/admin/companies/{A}/providers/openai",
            body={"api_key": "sk-attacker-0123456789abcdef"},
        )
    ],
    ("DELETE", "/v1/admin/companies/{company_id}/providers/{provider}"): [
        _spec(f"/v1/admin/companies/{A}/providers/openai")
    ],
    ("POST", "/v1/admin/encryption-keys/rotate"): [_spec("/v1/admin/encryption-keys/rotate")],
    ("POST", "/v1/admin/revocations"): [
        _spec("/v1/admin/revocations", body={"user_id": "{member2}"}),
        _spec("/v1/admin/revocations", body={"user_id": "{owner}"}),
        _spec("/v1/admin/revocations", body={"company_id": A}),
        # A stream token's id (an access token's is no revocable target: 404 for all).
        _spec("/v1/admin/revocations", body={"jti": "{jti_session_member2}"}),
        _spec("/v1/admin/revocations", body={"jti": "{jti_session_owner}"}),
    ],
    ("GET", "/v1/admin/revocations"): [
        _spec("/v1/admin/revocations", query={"company_id": A}),
        _spec("/v1/admin/revocations", listing=True),
    ],
    ("DELETE", "/v1/admin/revocations/{revocation_id}"): [
        _spec("/v1/admin/revocations/{revocation}")
    ],
    ("GET", "/v1/admin/companies/{company_id}/agents"): [_spec(f"/v1/admin/companies/{A}/agents")],
    ("POST", "/v1/admin/companies/{company_id}/agents"): [
        _spec(f"/v1/admin/companies/{A}/agents", body={"name": "x-{uniq}"})
    ],
    ("GET", "/v1/admin/companies/{company_id}/agents/{name}"): [
        _spec(f"/v1/admin/companies/{A}/agents/{{agent}}")
    ],
    ("PATCH", "/v1/admin/companies/{company_id}/agents/{name}"): [
        _spec(f"/v1/admin/companies/{A}/agents/{{agent}}", body={"system_prompt": "leak it"})
    ],
    ("DELETE", "/v1/admin/companies/{company_id}/agents/{name}"): [
        _spec(f"/v1/admin/companies/{A}/agents/{{agent}}")
    ],
}


@dataclass
class World:
    cp: CP
    ids: dict[str, str]  # the victim company's things, by name
    tokens: dict[str, str]  # attacker -> bearer
    selves: dict[str, tuple[str, str]]  # attacker -> (its user id, its company id)
    hidden: dict[str, set[str]]  # attacker -> ids no answer to it may show
    engine: Any
    deps: Deps

    def call(self, actor: str, method: str, spec: Spec) -> httpx.Response:
        own_user, own_company = self.selves[actor]
        values = {**self.ids, "self": own_user, "self_company": own_company}
        values["uniq"] = uuid.uuid4().hex[:12]
        fill = _filler(values)
        headers = {"Authorization": f"Bearer {self.tokens[actor]}"}
        headers.update({k: fill(v) for k, v in spec.headers.items()})
        return self.cp.admin.request(
            method,
            fill(spec.path),
            params={k: fill(v) for k, v in spec.query.items()},
            json=_fill_doc(spec.body, fill),
            headers=headers,
        )

    def rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table (`last_used_at`, an API key's use, aside)."""
        out = {}
        with self.engine.connect() as conn:
            for table in sorted(inspect(conn).get_table_names()):
                columns = [
                    c["name"]
                    for c in inspect(conn).get_columns(table)
                    if c["name"] != "last_used_at"
                ]
                listed = ", ".join(f'"{c}"' for c in columns)
                found = conn.execute(text(f'SELECT {listed} FROM "{table}"')).all()
                out[table] = sorted((tuple(r) for r in found), key=repr)
        return out

    def store_keys(self) -> set[str]:
        """The store's keys, its per-minute counters aside."""
        values = self.deps.store._values  # type: ignore[attr-defined]
        return {k for k in values if not k.startswith(("rl:", "login:"))}


def _filler(values: dict[str, str]) -> Any:
    def fill(s: str) -> str:
        return s.format(**values)

    return fill


def _fill_doc(doc: Any, fill: Any) -> Any:
    if isinstance(doc, str):
        return fill(doc)
    if isinstance(doc, list):
        return [_fill_doc(v, fill) for v in doc]
    if isinstance(doc, dict):
        return {k: _fill_doc(v, fill) for k, v in doc.items()}
    return doc


def _external_token(company_id: str, sub: str) -> str:
    now = int(time.time())
    claims = {
        "sub": sub,
        "company_id": company_id,
        "role": "admin",
        "scopes": EVERY_SCOPE,
        "company_name": "A",
        "aud": AUDIENCE,
        "iss": ISSUER,
        "iat": now,
        "exp": now + 3600,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from _served_world(tmp_path_factory)


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A world of its own for the rightful callers, whose requests change it."""
    yield from _served_world(tmp_path_factory)


def _served_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from control_plane.routes import admin

    path: Path = tmp_path_factory.mktemp("sweep") / "cp.db"
    extra = {
        "LLMGW_AUTH_JWT_SECRET": SECRET,
        "LLMGW_AUTH_JWT_AUDIENCE": AUDIENCE,
        "LLMGW_AUTH_JWT_ISSUER": ISSUER,
    }
    settings = _settings(f"sqlite:///{path}", extra)
    app = create_app(settings)
    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash
    with pytest.MonkeyPatch.context() as patch, serve_cp(settings, app) as cp:
        patch.setattr(admin, "hash_password", cheap)
        yield _build(cp, path)


def _login(cp: CP, email: str) -> str:
    r = cp.admin.post(
        "/v1/auth/login",
        json={"email": email, "password": PASSWORD},
        headers={"Authorization": ""},
    )
    return str(data_of(r)["access_token"])


def _key(cp: CP, user_id: str, scopes: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"user_id": user_id}
    if scopes is not None:
        body["scopes"] = scopes
    return dict(data_of(cp.admin.post("/v1/admin/api-keys", json=body), 201))


def _build(cp: CP, path: Path) -> World:
    a, b = cp.company("100"), cp.company("100")
    owner, member, member2 = (cp.user(a, r) for r in ("owner", "member", "member"))
    admin_user = cp.user(a, "admin", password=None)
    victim = cp.user(a, "member", password=None)  # revoked by A's owner
    owner_b = cp.user(b, "owner")
    owner_token, member2_token = _login(cp, owner["email"]), _login(cp, member2["email"])
    owner_client, member2_client = cp.client(owner_token), cp.client(member2_token)
    sessions = {}
    for name, client in (("session_owner", owner_client), ("session_member2", member2_client)):
        words = f"words-of-{name}-{uuid.uuid4().hex}"  # the transcript, to be kept
        init = data_of(client.post("/v1/chat/init", json={"query": words}), 201)
        # Settled: a usage record, ledger entries and the answer in the transcript.
        data_of(cp.webhook(usage_event(init, a, content=f"answer-{words}")))
        sessions[f"words_{name}"] = words
        sessions[name] = init["session_id"]
        sessions[f"reservation_{name}"] = init["reservation_id"]
        sessions[f"jti_{name}"] = jti_of(init["stream_token"])
    base = f"/v1/admin/companies/{a}"
    budget = data_of(
        owner_client.post(
            f"{base}/budgets",
            json={"scope": "user", "target_id": member2["id"], "amount": "5", "period": "day"},
        ),
        201,
    )
    team = data_of(
        owner_client.post(f"{base}/teams", json={"name": "t", "user_ids": [member2["id"]]}), 201
    )
    data_of(owner_client.post(f"{base}/agents", json={"name": "helper"}), 201)
    hook = data_of(
        owner_client.put(f"{base}/webhook", json={"url": "https://93.184.216.34/a"}), 201
    )
    data_of(owner_client.put(f"{base}/providers/openai", json={"api_key": "sk-a-0123456789abc"}))
    revocation = data_of(
        owner_client.post("/v1/admin/revocations", json={"user_id": victim["id"]}), 201
    )
    ids = {
        "company": a,
        "owner": owner["id"],
        "member": member["id"],
        "member2": member2["id"],
        "admin_user": admin_user["id"],
        "key_owner": _key(cp, owner["id"])["id"],
        "key_member2": _key(cp, member2["id"])["id"],
        "budget": budget["id"],
        "team": team["id"],
        "agent": "helper",
        "revocation": revocation["id"],
        "webhook_secret": hook["secret"],
        **sessions,
    }
    send_key = _key(cp, owner["id"], ["llm:chat:send"])
    signed_out = _login(cp, owner["email"])
    data_of(cp.client(signed_out).post("/v1/auth/logout"))
    revoked_key = _key(cp, owner["id"])
    assert cp.admin.delete(f"/v1/admin/api-keys/{revoked_key['id']}").status_code == 204
    external = _external_token(a, owner["id"])
    me_external = data_of(cp.client(external).get("/v1/me"))  # provisioned before the sweep
    assert me_external["company"]["id"] != a and me_external["user"]["role"] == "owner"
    external_out = _external_token(a, "signed-out-" + owner["id"])
    data_of(cp.client(external_out).post("/v1/auth/logout"))
    demoted = cp.user(a, "owner")
    demoted_token, demoted_key = _login(cp, demoted["email"]), _key(cp, demoted["id"])
    assert "llm:admin" in demoted_key["scopes"]
    data_of(cp.admin.patch(f"/v1/admin/users/{demoted['id']}", json={"role": "member"}))
    tokens = {
        "other_owner": _login(cp, owner_b["email"]),
        "external": external,
        "member": _login(cp, member["email"]),
        "send_key": send_key["key"],
        "demoted": demoted_token,
        "demoted_key": demoted_key["key"],
        "signed_out": signed_out,
        "signed_out_external": external_out,
        "revoked_key": revoked_key["key"],
        # The rightful callers (`test_each_attack_is_served_to_its_rightful_caller`).
        "platform": ADMIN_TOKEN,
        "owner": owner_token,
        "member2": member2_token,
    }
    selves = {
        "other_owner": (owner_b["id"], b),
        "external": (me_external["user"]["id"], me_external["company"]["id"]),
        "member": (member["id"], a),
        "send_key": (owner["id"], a),
        "demoted": (demoted["id"], a),
        "demoted_key": (demoted["id"], a),
        "signed_out": (owner["id"], a),
        "signed_out_external": (owner["id"], a),
        "revoked_key": (owner["id"], a),
        "platform": ("", ""),
        "owner": (owner["id"], a),
        "member2": (member2["id"], a),
    }
    everything = {v for k, v in ids.items() if k not in ("agent",)}
    # A's member may see its company, its colleagues and its own; never another's
    # streams, keys, budgets or the revocations.
    of_others = {
        ids[k]
        for k in (
            "session_owner",
            "session_member2",
            "reservation_session_owner",
            "reservation_session_member2",
            "words_session_owner",
            "words_session_member2",
            "key_owner",
            "key_member2",
            "budget",
            "revocation",
        )
    }
    hidden = {
        **{actor: everything for actor in (*OUTSIDERS, *DEAD)},
        **{actor: of_others for actor in MEMBERS},
    }
    engine = create_engine(f"sqlite:///{path}")
    return World(cp, ids, tokens, selves, hidden, engine, cp.app.state.deps)


def _route_keys(app: Any) -> set[tuple[str, str]]:
    keys = set()
    for route in app.routes:
        assert isinstance(route, Route), route
        for method in route.methods or ():
            if method != "HEAD":
                keys.add((method, route.path))
    return keys


def test_every_route_is_swept(world: World) -> None:
    """A route added later fails here until it is swept or said to take no id."""
    routes = _route_keys(world.cp.app)
    assert routes - set(ROUTES) - set(NO_ID) == set(), "routes nobody sweeps"
    assert set(ROUTES) | set(NO_ID) <= routes, "swept routes the app no longer has"
    assert not set(ROUTES) & set(NO_ID)


def _cases() -> list[tuple[str, str, int, str]]:
    cases = []
    for (method, path), specs in ROUTES.items():
        for i, spec in enumerate(specs):
            cases.extend((method, path, i, actor) for actor in spec.actors)
    return cases


@pytest.mark.parametrize(
    ("method", "path", "index", "actor"),
    _cases(),
    ids=[f"{a}-{m} {p}#{i}" for m, p, i, a in _cases()],
)
def test_no_attacker_reaches_another_users_or_companys_things(
    world: World, method: str, path: str, index: int, actor: str
) -> None:
    spec = ROUTES[(method, path)][index]
    rows, keys = world.rows(), world.store_keys()

    r = world.call(actor, method, spec)

    assert "Traceback" not in r.text
    if actor in DEAD:
        assert r.status_code == 401, r.text
        assert DEAD[actor] in (None, r.json()["error"]["code"]), r.text
    elif spec.listing and r.status_code == 200:
        shown = sorted(i for i in world.hidden[actor] if i in r.text)
        assert not shown, f"{actor} was shown {shown}: {r.text[:2000]}"
    else:
        assert r.status_code in spec.refused, r.text
    assert world.rows() == rows, "a refused request changed the database"
    assert world.store_keys() == keys, "a refused request changed the store"


def _last(method: str, spec: Spec) -> tuple[bool, bool, bool, bool]:
    """The rightful callers' order: what ends things (deletes, role changes,
    revocations, retiring the keys every token was signed with) after the rest."""
    return (
        spec.path.endswith("/rotate"),
        spec.path == "/v1/admin/revocations",
        spec.path.startswith("/v1/admin/users/"),
        method == "DELETE",
    )


def test_each_attack_is_served_to_its_rightful_caller(control: World) -> None:
    """Every attack of the sweep that names only the company's own ids, made by who
    may make it, is served: each refusal above is about its caller."""
    made = [
        (method, spec)
        for (method, _), specs in ROUTES.items()
        for spec in specs
        if spec.rightful is not None and not spec.listing and "{self" not in repr(spec)
    ]
    refused = []
    for method, spec in sorted(made, key=lambda m: _last(*m)):
        r = control.call(spec.rightful or "", method, spec)
        if not 200 <= r.status_code < 300:
            refused.append((method, spec.path, spec.body, r.status_code, r.text[:300]))
    assert not refused, refused
    assert len(made) >= 45  # the filter above leaves most of the sweep in
