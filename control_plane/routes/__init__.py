"""HTTP handlers, one module per area; `all_routes` is the app's route table."""

from __future__ import annotations

from starlette.routing import BaseRoute

from control_plane.routes import (
    account,
    admin,
    admin_budgets,
    admin_credits,
    admin_llm,
    admin_revocations,
    agents,
    billing,
    chat,
    console,
    demo,
    internal,
    ops,
    usage_summary,
    webhooks,
)


def all_routes() -> list[BaseRoute]:
    return [
        *ops.routes,
        *account.routes,
        *chat.routes,
        *usage_summary.routes,
        *billing.routes,
        *webhooks.routes,
        *admin.routes,
        *admin_budgets.routes,
        *admin_credits.routes,
        *admin_llm.routes,
        *admin_revocations.routes,
        *agents.routes,
        *demo.routes,
        *console.routes,
        *internal.routes,
    ]
