"""`docs/api.md`, the public reference, generated from the code so it cannot drift.

    python -m llm_gateway.apidoc          # rewrite docs/api.md
    python -m llm_gateway.apidoc --check  # exit 1 when docs/api.md is out of date

Endpoints come from the two services' route tables (the control plane's through its
OpenAPI document), token claims from `shared.tokens.stream_claims`, the usage
webhook's fields from `shared.webhooks.UsageEvent`, metrics from the services'
registries, settings from `.env.example` (which `tests/test_api_doc.py` checks
against every `LLMGW_*` name the code reads), and which service reads each from the
names the services' settings ask for (`settings_read_by`). DESIGN.md stays the
contract; this page is what the code says it does.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from starlette.routing import Route

from llm_gateway.setting_names import settings_lookups

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "api.md"
ENV_EXAMPLE = ROOT / ".env.example"
SETTING = re.compile(r"^#?\s*(LLMGW_[A-Z0-9_]+)=(\S*)\s*(?:#\s*(.*))?$")
# `.env.example` groups its variables under `# === read by <reader> ===` lines.
GROUP = re.compile(r"^# === read by (.+) ===$")
SERVICES = ("both", "control plane", "edge")


def _control_plane_rows() -> Iterator[str]:
    from control_plane.openapi import openapi_document
    from control_plane.routes import all_routes

    doc = openapi_document(all_routes())
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            params = [p["name"] for p in op.get("parameters", []) if p["in"] == "query"]
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            fields = sorted(body.get("schema", {}).get("properties", {}))
            query = ", ".join(f"`{p}`" for p in params)
            body_text = ", ".join(f"`{f}`" for f in fields)
            summary = op.get("summary", "")
            yield f"| {method.upper()} | `{path}` | {summary} | {query} | {body_text} |"


def _edge_rows() -> Iterator[str]:
    from shared.webhooks import generate_secret
    from stream_edge.app import create_app
    from stream_edge.settings import EdgeSettings

    # Throwaway secrets: the app is only built to read its route table, never served.
    env = {
        "LLMGW_WEBHOOK_SECRET": generate_secret(),
        "LLMGW_ENCRYPTION_KEY": Fernet.generate_key().decode(),
    }
    app = create_app(EdgeSettings.from_env(env))
    for route in app.routes:
        if not isinstance(route, Route):
            continue
        doc = inspect.getdoc(route.endpoint) or ""
        summary = doc.splitlines()[0] if doc else ""
        for method in sorted((route.methods or set()) - {"HEAD"}):
            yield f"| {method} | `{route.path}` | {summary} |"


def _claims() -> list[str]:
    from shared.route_claim import CLAIM as ROUTE_CLAIM
    from shared.tokens import AGENT_CLAIM, stream_claims

    claims = stream_claims(
        user_id="u", company_id="c", role="member", scopes=[], session_id="s", model="m",
        max_tokens=1, max_input_tokens=1, reservation_id="r", request_id="q", now=0,
        ttl_seconds=1, jti="j",
    )  # fmt: skip
    rows = [f"| `{name}` | always |" for name in claims]
    rows.append(f"| `{AGENT_CLAIM}` | when the stream runs a company's agent |")
    rows.append(f"| `{ROUTE_CLAIM}` | when the company's own key or model serves (sealed) |")
    return rows


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _webhook_fields() -> list[str]:
    from shared.webhooks import UsageEvent

    hints = typing.get_type_hints(UsageEvent)
    return [
        f"| `{f.name}` | `{_type_name(hints[f.name])}` |" for f in dataclasses.fields(UsageEvent)
    ]


def _metric_rows() -> list[str]:
    from control_plane.metrics import Metrics
    from stream_edge.metrics import EdgeMetrics

    rows = []
    for service, metrics in (("edge", EdgeMetrics()), ("control plane", Metrics())):
        for collector in vars(metrics).values():
            # prometheus_client keeps a metric's declaration in these attributes.
            name = getattr(collector, "_name", None)
            if not isinstance(name, str):
                continue
            kind = getattr(collector, "_type", "")
            labels = ", ".join(f"`{label}`" for label in getattr(collector, "_labelnames", ()))
            doc = getattr(collector, "_documentation", "")
            suffix = "_total" if kind == "counter" else ""
            rows.append(f"| `{name}{suffix}` | {service} | {kind} | {labels} | {doc} |")
    return rows


def settings_documented() -> list[tuple[str, str, str, str]]:
    """(name, default, note, reader) for every `LLMGW_*` line of `.env.example`;
    the reader is its group's (empty before the first group)."""
    out = []
    reader = ""
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if group := GROUP.match(line.strip()):
            reader = group[1]
        elif match := SETTING.match(line.strip()):
            out.append((match[1], match[2], match[3] or "", reader))
    return out


def settings_read_by() -> dict[str, str]:
    """`LLMGW_*` name → "both", "control plane" or "edge": which service's settings
    look it up in the environment (`setting_names.settings_lookups`)."""
    cp_read, edge_read = settings_lookups()
    out = {}
    for name in sorted(cp_read | edge_read):
        if name.startswith("LLMGW_"):
            out[name] = (
                "both" if name in cp_read & edge_read else "control plane" if name in cp_read
                else "edge"
            )  # fmt: skip
    return out


def render() -> str:
    read_by = settings_read_by()
    settings = [
        f"| `{name}` | {read_by.get(name, reader)} | "
        + (f"`{default}`" if default else "")
        + f" | {note.replace('|', '/')} |"
        for name, default, note, reader in settings_documented()
    ]
    parts = [
        "# API reference",
        "",
        "Generated by `python -m llm_gateway.apidoc` from the code; `tests/test_api_doc.py`",
        "fails when it is out of date. The contract and its reasons are in",
        "`docs/architecture.md`; request and response bodies in `/openapi.json`.",
        "",
        "## Control plane",
        "",
        'Every `/v1/…` JSON answer is `{"success": true, "data": …, "meta": …}` or',
        '`{"success": false, "message", "error": {"code", "details"?}}`.',
        "",
        "| method | path | what | query | body fields |",
        "|---|---|---|---|---|",
        *_control_plane_rows(),
        "",
        "## Stream edge",
        "",
        'Errors in OpenAI\'s shape: `{"error": {"message", "type", "code"}}`.',
        "",
        "| method | path | what |",
        "|---|---|---|",
        *_edge_rows(),
        "",
        "## Stream token claims",
        "",
        "EdDSA JWT, `kid` in the header, public keys at `/.well-known/jwks.json`.",
        "",
        "| claim | present |",
        "|---|---|",
        *_claims(),
        "",
        "## Usage webhook",
        "",
        "`POST {LLMGW_CONTROL_PLANE_URL}/v1/webhooks/usage`, Standard Webhooks signature,",
        '`webhook-id: usage_<jti>`, body `{"type": "stream.<status>", "timestamp", "data"}`',
        "with these `data` fields:",
        "",
        "| field | type |",
        "|---|---|",
        *_webhook_fields(),
        "",
        "## Metrics",
        "",
        "| name | service | type | labels | what |",
        "|---|---|---|---|---|",
        *_metric_rows(),
        "",
        "## Settings",
        "",
        'From `.env.example` (a value there is its example or default). "read by": the',
        "service whose settings read it (`control_plane/settings.py`,",
        "`stream_edge/settings.py`; both: `shared/settings.py`), else who else does.",
        "",
        "| variable | read by | example | note |",
        "|---|---|---|---|",
        *settings,
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_gateway.apidoc")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print("docs/api.md is out of date: run python -m llm_gateway.apidoc", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
