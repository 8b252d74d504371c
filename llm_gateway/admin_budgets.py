"""`llm-gateway admin` commands for budgets, teams and the company webhook
(issue 16.3): thin request builders over ``/v1/admin/companies/{id}/budgets…``,
``…/teams…`` and ``…/webhook``, so the API's rules are the only rules."""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import quote

Request = tuple[str, str, dict[str, Any] | None, dict[str, str]]

PERIODS = ["day", "week", "month", "none"]


def segment(value: str) -> str:
    """An id as one path segment: an id pasted from elsewhere (a ticket, a chat)
    holding ``../`` or ``?`` would otherwise aim the request at another route, as
    ``delete-team c1 ../../../api-keys/K`` revoked the key K."""
    return quote(value, safe="")


def add_budget_parsers(actions: Any) -> None:
    create = actions.add_parser("create-budget", help="a spend limit on a user, API key or team")
    create.add_argument("company_id")
    create.add_argument("scope", choices=["user", "api_key", "team"])
    create.add_argument("target_id")
    create.add_argument("amount", help='credits, e.g. "25" or "2.5"')
    create.add_argument("--period", default="month", choices=PERIODS)
    listed = actions.add_parser("list-budgets")
    listed.add_argument("company_id")
    update = actions.add_parser("update-budget")
    update.add_argument("company_id")
    update.add_argument("budget_id")
    update.add_argument("--amount")
    update.add_argument("--period", choices=PERIODS)
    remove = actions.add_parser("delete-budget")
    remove.add_argument("company_id")
    remove.add_argument("budget_id")
    team = actions.add_parser("create-team", help="a named group of a company's users")
    team.add_argument("company_id")
    team.add_argument("name")
    team.add_argument("--user-id", action="append", dest="user_ids", default=[])
    teams = actions.add_parser("list-teams")
    teams.add_argument("company_id")
    set_team = actions.add_parser("update-team", help="rename and/or replace the members")
    set_team.add_argument("company_id")
    set_team.add_argument("team_id")
    set_team.add_argument("--name")
    set_team.add_argument("--user-id", action="append", dest="user_ids", default=None)
    drop_team = actions.add_parser("delete-team")
    drop_team.add_argument("company_id")
    drop_team.add_argument("team_id")
    hook = actions.add_parser(
        "set-webhook", help="where budget.threshold events go (the first call prints the secret)"
    )
    hook.add_argument("company_id")
    hook.add_argument("url")


ACTIONS = frozenset(
    {
        "create-budget",
        "list-budgets",
        "update-budget",
        "delete-budget",
        "create-team",
        "list-teams",
        "update-team",
        "delete-team",
        "set-webhook",
    }
)


def budget_request(args: argparse.Namespace) -> Request:
    base = f"/v1/admin/companies/{segment(args.company_id)}"
    action = args.action
    if action == "create-budget":
        body = {
            "scope": args.scope,
            "target_id": args.target_id,
            "amount": args.amount,
            "period": args.period,
        }
        return "POST", f"{base}/budgets", body, {}
    if action == "list-budgets":
        return "GET", f"{base}/budgets", None, {}
    if action == "update-budget":
        changes = {k: v for k, v in (("amount", args.amount), ("period", args.period)) if v}
        return "PATCH", f"{base}/budgets/{segment(args.budget_id)}", changes, {}
    if action == "delete-budget":
        return "DELETE", f"{base}/budgets/{segment(args.budget_id)}", None, {}
    if action == "create-team":
        return "POST", f"{base}/teams", {"name": args.name, "user_ids": args.user_ids}, {}
    if action == "list-teams":
        return "GET", f"{base}/teams", None, {}
    if action == "update-team":
        team: dict[str, Any] = {}
        if args.name:
            team["name"] = args.name
        if args.user_ids is not None:
            team["user_ids"] = args.user_ids
        return "PATCH", f"{base}/teams/{segment(args.team_id)}", team, {}
    if action == "delete-team":
        return "DELETE", f"{base}/teams/{segment(args.team_id)}", None, {}
    assert action == "set-webhook", action
    return "PUT", f"{base}/webhook", {"url": args.url}, {}
