"""`llm-gateway admin …`: the admin API from the terminal.

Talks HTTP to the control plane (`LLMGW_CONTROL_PLANE_URL`) with `LLMGW_ADMIN_TOKEN`,
so the CLI and the API can never disagree about the rules.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from typing import Any

import httpx


def add_admin_parser(sub: Any) -> None:
    admin = sub.add_parser("admin", help="companies, users, API keys, credits, signing keys")
    actions = admin.add_subparsers(dest="action", required=True)
    company = actions.add_parser("create-company")
    company.add_argument("name")
    company.add_argument("--credits", default="0")
    user = actions.add_parser("create-user")
    user.add_argument("company_id")
    user.add_argument("email")
    user.add_argument("--password")
    user.add_argument("--role", default="member", choices=["member", "owner", "admin"])
    key = actions.add_parser("create-api-key")
    key.add_argument("user_id")
    key.add_argument("--scope", action="append", dest="scopes")
    grant = actions.add_parser("grant")
    grant.add_argument("company_id")
    grant.add_argument("amount")
    grant.add_argument("--reason", default="granted from the CLI")
    grant.add_argument("--idempotency-key", default=None)
    revoke = actions.add_parser("revoke-api-key")
    revoke.add_argument("key_id")
    actions.add_parser("rotate-signing-key")


def _request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None, dict[str, str]]:
    headers: dict[str, str] = {}
    if args.action == "create-company":
        return "POST", "/v1/admin/companies", {"name": args.name, "credits": args.credits}, headers
    if args.action == "create-user":
        body = {"company_id": args.company_id, "email": args.email, "role": args.role}
        if args.password:
            body["password"] = args.password
        return "POST", "/v1/admin/users", body, headers
    if args.action == "create-api-key":
        body_key: dict[str, Any] = {"user_id": args.user_id}
        if args.scopes:
            body_key["scopes"] = args.scopes
        return "POST", "/v1/admin/api-keys", body_key, headers
    if args.action == "grant":
        headers["Idempotency-Key"] = args.idempotency_key or uuid.uuid4().hex
        path = f"/v1/admin/companies/{args.company_id}/credits"
        return "POST", path, {"amount": args.amount, "reason": args.reason}, headers
    if args.action == "revoke-api-key":
        return "DELETE", f"/v1/admin/api-keys/{args.key_id}", None, headers
    return "POST", "/v1/admin/signing-keys/rotate", {}, headers


def run_admin(args: argparse.Namespace) -> int:
    token = os.environ.get("LLMGW_ADMIN_TOKEN")
    if not token:
        print("llm-gateway admin: set LLMGW_ADMIN_TOKEN", file=sys.stderr)
        return 2
    base = os.environ.get("LLMGW_CONTROL_PLANE_URL", "http://127.0.0.1:8000").rstrip("/")
    method, path, body, headers = _request(args)
    headers["Authorization"] = f"Bearer {token}"
    try:
        response = httpx.request(method, base + path, json=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        print(f"llm-gateway admin: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    if response.status_code == 204:
        print("ok")
        return 0
    try:
        payload = response.json()
    except ValueError:
        print(f"llm-gateway admin: HTTP {response.status_code}", file=sys.stderr)
        return 1
    if response.is_success:
        print(json.dumps(payload.get("data", payload), indent=2))
        return 0
    print(f"llm-gateway admin: {payload.get('message', response.status_code)}", file=sys.stderr)
    return 1
