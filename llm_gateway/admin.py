"""`llm-gateway admin …`: the admin API from the terminal.

Talks HTTP to the control plane (`LLMGW_CONTROL_PLANE_URL`) with `LLMGW_ADMIN_TOKEN`,
so the CLI and the API can never disagree about the rules. Secrets (provider keys,
passwords) are read from stdin or an environment variable, never from the command
line, where they would land in the shell history and the process list.

`route-key` works offline: it prints the edge's LLMGW_ROUTE_KEY for the
LLMGW_ENCRYPTION_KEY ring in this environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from llm_gateway.admin_budgets import ACTIONS as BUDGET_ACTIONS
from llm_gateway.admin_budgets import add_budget_parsers, budget_request, segment

Request = tuple[str, str, dict[str, Any] | None, dict[str, str]]


class UsageError(Exception):
    pass


class _RefusePassword(argparse.Action):
    """`--password x` would put the password in `ps` and the shell history."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        parser.error(
            "--password would show the password in the process list; "
            "use --password-env VAR or --password-stdin"
        )


def add_admin_parser(sub: Any) -> None:
    admin = sub.add_parser(
        "admin",
        help="companies, users, API keys, provider keys, agents, credits, budgets, revocations",
    )
    actions = admin.add_subparsers(dest="action", required=True)
    company = actions.add_parser("create-company")
    company.add_argument("name")
    company.add_argument("--credits", default="0")
    user = actions.add_parser("create-user", allow_abbrev=False)
    user.add_argument("company_id")
    user.add_argument("email")
    password = user.add_mutually_exclusive_group()
    password.add_argument(
        "--password-env", metavar="VAR", help="read the password from this variable"
    )
    password.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin"
    )
    user.add_argument("--password", action=_RefusePassword, help=argparse.SUPPRESS)
    user.add_argument("--role", default="member", choices=["member", "owner", "admin"])
    key = actions.add_parser("create-api-key")
    key.add_argument("user_id")
    key.add_argument("--scope", action="append", dest="scopes")
    keys = actions.add_parser("list-api-keys")
    keys.add_argument("--user-id")
    keys.add_argument("--company-id")
    grant = actions.add_parser("grant")
    grant.add_argument("company_id")
    grant.add_argument("amount")
    grant.add_argument("--reason", default="granted from the CLI")
    grant.add_argument("--idempotency-key", default=None)
    adjust = actions.add_parser("adjust", help="correct a company's credits either way")
    adjust.add_argument("company_id")
    adjust.add_argument("amount", help='e.g. "-1.5" or "2"')
    adjust.add_argument("--reason", required=True)
    adjust.add_argument("--idempotency-key", default=None)
    revoke = actions.add_parser("revoke-api-key")
    revoke.add_argument("key_id")
    provider = actions.add_parser(
        "set-provider", help="a company's own provider key, default model and models"
    )
    provider.add_argument("company_id")
    provider.add_argument("provider")
    source = provider.add_mutually_exclusive_group()
    source.add_argument("--api-key-env", metavar="VAR", help="read the key from this variable")
    source.add_argument("--api-key-stdin", action="store_true", help="read the key from stdin")
    source.add_argument("--remove-api-key", action="store_true")
    provider.add_argument("--default-model")
    provider.add_argument(
        "--models-file", type=Path, help="JSON object: model id → partial model spec"
    )
    providers = actions.add_parser("list-providers")
    providers.add_argument("company_id")
    _add_agent_parsers(actions)
    revocation = actions.add_parser("revoke", help="revoke a user, a company or one token")
    target = revocation.add_mutually_exclusive_group(required=True)
    target.add_argument("--user-id")
    target.add_argument("--company-id")
    target.add_argument("--jti")
    revocation.add_argument("--reason")
    lift = actions.add_parser("unrevoke", help="lift a revocation")
    lift.add_argument("revocation_id")
    actions.add_parser("list-revocations")
    rotate = actions.add_parser("rotate-signing-key")
    rotate.add_argument(
        "--retire-others",
        action="store_true",
        help="retire every other key now (one leaked): their tokens stop verifying",
    )
    actions.add_parser(
        "rotate-encryption-key",
        help="re-encrypt stored secrets under the newest LLMGW_ENCRYPTION_KEY",
    )
    add_budget_parsers(actions)
    actions.add_parser(
        "route-key",
        help="print the edge's LLMGW_ROUTE_KEY for this LLMGW_ENCRYPTION_KEY (offline)",
    )


def _add_agent_parsers(actions: Any) -> None:
    """`create-agent` / `update-agent` take the prompt and tools from files (a prompt
    is long text, tools are JSON); `update-agent` sends only the options given."""
    for action in ("create-agent", "update-agent"):
        agent = actions.add_parser(action, help=f"{action.split('-')[0]} a company's agent")
        agent.add_argument("company_id")
        agent.add_argument("name")
        model = agent.add_mutually_exclusive_group()
        model.add_argument("--model")
        model.add_argument(
            "--default-model", action="store_true", help="use the company's default model"
        )
        agent.add_argument("--system-prompt-file", type=Path)
        agent.add_argument("--tools-file", type=Path, help="JSON array of OpenAI function tools")
        agent.add_argument("--max-tokens", type=int)
        agent.add_argument("--feature", action="append", dest="features")
    for action in ("get-agent", "delete-agent"):
        one = actions.add_parser(action)
        one.add_argument("company_id")
        one.add_argument("name")
    actions.add_parser("list-agents").add_argument("company_id")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def _agent_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"name": args.name} if args.action == "create-agent" else {}
    if args.model:
        body["model"] = args.model
    elif args.default_model:
        body["model"] = None
    if args.system_prompt_file:
        body["system_prompt"] = _read(args.system_prompt_file)
    if args.tools_file:
        try:
            body["tools"] = json.loads(_read(args.tools_file))
        except ValueError as exc:
            raise UsageError(f"{args.tools_file} is not JSON: {exc}") from None
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.features:
        body["features"] = args.features
    return body


def _agent_request(args: argparse.Namespace) -> Request | None:
    agents = f"/v1/admin/companies/{segment(args.company_id)}/agents"
    if args.action == "list-agents":
        return "GET", agents, None, {}
    if args.action == "create-agent":
        return "POST", agents, _agent_body(args), {}
    one = f"{agents}/{segment(args.name)}"
    if args.action == "update-agent":
        return "PATCH", one, _agent_body(args), {}
    if args.action == "get-agent":
        return "GET", one, None, {}
    if args.action == "delete-agent":
        return "DELETE", one, None, {}
    return None


def _secret_from(env_var: str | None, stdin: bool, what: str) -> str | None:
    """A secret from a named variable or stdin's first line; None when neither given."""
    if env_var:
        value = os.environ.get(env_var, "").strip()
        if not value:
            raise UsageError(f"{env_var} is not set")
        return value
    if stdin:
        value = sys.stdin.readline().strip()
        if not value:
            raise UsageError(f"no {what} on stdin")
        return value
    return None


def _provider_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    api_key = _secret_from(args.api_key_env, args.api_key_stdin, "key")
    if api_key is not None:
        body["api_key"] = api_key
    elif args.remove_api_key:
        body["api_key"] = None
    if args.default_model:
        body["default_model"] = args.default_model
    if args.models_file:
        try:
            body["models"] = json.loads(args.models_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {args.models_file}: {exc}") from None
    return body


def _request(args: argparse.Namespace) -> Request:
    headers: dict[str, str] = {}
    action = args.action
    if action.endswith(("-agent", "-agents")) and (agent := _agent_request(args)) is not None:
        return agent
    if action in BUDGET_ACTIONS:
        return budget_request(args)
    if action == "create-company":
        return "POST", "/v1/admin/companies", {"name": args.name, "credits": args.credits}, headers
    if action == "create-user":
        body = {"company_id": args.company_id, "email": args.email, "role": args.role}
        password = _secret_from(args.password_env, args.password_stdin, "password")
        if password is not None:
            body["password"] = password
        return "POST", "/v1/admin/users", body, headers
    if action == "create-api-key":
        body_key: dict[str, Any] = {"user_id": args.user_id}
        if args.scopes:
            body_key["scopes"] = args.scopes
        return "POST", "/v1/admin/api-keys", body_key, headers
    if action == "list-api-keys":
        query = urlencode(
            [
                (name, value)
                for name, value in (("user_id", args.user_id), ("company_id", args.company_id))
                if value
            ]
        )
        return "GET", "/v1/admin/api-keys" + (f"?{query}" if query else ""), None, headers
    if action in ("grant", "adjust"):
        headers["Idempotency-Key"] = args.idempotency_key or uuid.uuid4().hex
        kind = "credits" if action == "grant" else "adjustments"
        path = f"/v1/admin/companies/{segment(args.company_id)}/{kind}"
        return "POST", path, {"amount": args.amount, "reason": args.reason}, headers
    if action == "revoke-api-key":
        return "DELETE", f"/v1/admin/api-keys/{segment(args.key_id)}", None, headers
    if action == "set-provider":
        path = f"/v1/admin/companies/{segment(args.company_id)}/providers/{segment(args.provider)}"
        return "PUT", path, _provider_body(args), headers
    if action == "list-providers":
        return "GET", f"/v1/admin/companies/{segment(args.company_id)}/providers", None, headers
    if action == "revoke":
        body_rev: dict[str, Any] = (
            {"user_id": args.user_id}
            if args.user_id
            else {"company_id": args.company_id}
            if args.company_id
            else {"jti": args.jti}
        )
        if args.reason:
            body_rev["reason"] = args.reason
        return "POST", "/v1/admin/revocations", body_rev, headers
    if action == "unrevoke":
        return "DELETE", f"/v1/admin/revocations/{segment(args.revocation_id)}", None, headers
    if action == "list-revocations":
        return "GET", "/v1/admin/revocations", None, headers
    if action == "rotate-encryption-key":
        return "POST", "/v1/admin/encryption-keys/rotate", {}, headers
    body = {"retire_others": True} if args.retire_others else {}
    return "POST", "/v1/admin/signing-keys/rotate", body, headers


def _route_key() -> int:
    from shared.route_claim import route_key

    ring = [k.strip() for k in os.environ.get("LLMGW_ENCRYPTION_KEY", "").split(",") if k.strip()]
    if not ring:
        print("llm-gateway admin: set LLMGW_ENCRYPTION_KEY", file=sys.stderr)
        return 2
    try:
        print(",".join(route_key(key) for key in ring))
    except ValueError:
        print("llm-gateway admin: LLMGW_ENCRYPTION_KEY must be Fernet keys", file=sys.stderr)
        return 2
    return 0


def run_admin(args: argparse.Namespace) -> int:
    if args.action == "route-key":
        return _route_key()
    token = os.environ.get("LLMGW_ADMIN_TOKEN")
    if not token:
        print("llm-gateway admin: set LLMGW_ADMIN_TOKEN", file=sys.stderr)
        return 2
    base = os.environ.get("LLMGW_CONTROL_PLANE_URL", "http://127.0.0.1:8000").rstrip("/")
    try:
        method, path, body, headers = _request(args)
    except UsageError as exc:
        print(f"llm-gateway admin: {exc}", file=sys.stderr)
        return 2
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
