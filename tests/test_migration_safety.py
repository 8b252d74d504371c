"""Migrations run against a live PostgreSQL while the previous version serves
(docs/operations.md, "Migrations"), so none may hold a lock the hot paths need for
as long as it runs over a big table. Read from the migrations' source (their
``upgrade``), per statement on a table the migration did not create itself:

* ``index``: CREATE INDEX holds SHARE (no INSERT/UPDATE/DELETE) for the whole build,
  unless ``postgresql_concurrently=True`` inside ``op.get_context().autocommit_block()``
  (or `create_index_online`, control_plane/migrations/online.py, which does both);
* ``not-null-default``: ADD COLUMN NOT NULL without a constant default rewrites the
  table (or fails on a non-empty one) under ACCESS EXCLUSIVE;
* ``rewrite``: ALTER COLUMN of type or to NOT NULL rewrites or scans under it;
* ``constraint``: a CHECK or FOREIGN KEY without ``postgresql_not_valid=True`` scans
  the table under its lock; a UNIQUE or PRIMARY KEY builds an index under it;
* ``backfill``: an UPDATE/DELETE of a table rather than of one keyed row locks and
  rewrites every row it touches until it commits.

A migration already applied in the field that cannot be made online without
changing what it does is listed in `ACCEPTED`, with why; nothing else is.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ROOT / "control_plane" / "migrations" / "versions"


class Hazard(NamedTuple):
    migration: str
    rule: str
    table: str
    line: int
    why: str

    def __str__(self) -> str:
        return f"{self.migration}.py:{self.line}: [{self.rule}] {self.table}: {self.why}"


# (migration, rule, table): why it stays.
ACCEPTED: dict[tuple[str, str, str], str] = {
    ("0004_abuse_limits", "backfill", "chat_sessions"): (
        "counts every session's messages once; batching it would let sessions appended "
        "to between batches be counted differently from the rest (applied in the field)"
    ),
    ("0013_ledger_user", "backfill", "ledger_entries"): (
        "a contract step: its CHECK needs every stream row's user set in the same "
        "transaction, which no batched or concurrent form gives (applied in the field)"
    ),
    ("0013_ledger_user", "constraint", "ledger_entries"): (
        "the CHECK must hold from the backfill's commit on (NOT VALID would let rows "
        "written between the two in unchecked)"
    ),
    ("0013_ledger_user", "index", "ledger_entries"): (
        "the idempotency key's UNIQUE constraint becomes a partial index of the same "
        "name in one transaction, so the key is never unenforced"
    ),
    ("0015_budget_event_rearm", "index", "budget_events"): (
        "the threshold key's UNIQUE constraint becomes a partial index of the same name "
        "in one transaction (a few rows per budget and period)"
    ),
}

CONSTANT_SQL = re.compile(r"^\s*(-?\d+(\.\d+)?|'[^']*'|true|false)\s*$", re.IGNORECASE)
WRITE_SQL = re.compile(r'^\s*(?:UPDATE|DELETE\s+FROM)\s+"?(\w+)"?', re.IGNORECASE)
KEYED_WHERE = re.compile(r"\bWHERE\s+(\w+\.)?id\s*=\s*:\w+\s*$", re.IGNORECASE)


def _keywords(call: ast.Call) -> dict[str, ast.expr]:
    return {k.arg: k.value for k in call.keywords if k.arg is not None}


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def _sql_text(node: ast.expr) -> str | None:
    """The SQL of an `execute` argument: a literal, an f-string's literal parts, or
    `sa.text(...)` of one."""
    if isinstance(node, ast.Call) and node.args and _name(node.func) == "text":
        return _sql_text(node.args[0])
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "?" for v in node.values)
    return None


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def _constant_default(node: ast.expr | None) -> bool:
    if isinstance(node, ast.Constant):
        return not isinstance(node.value, str) or bool(CONSTANT_SQL.match(node.value))
    if isinstance(node, ast.Call) and _name(node.func) == "text" and node.args:
        sql = _sql_text(node.args[0])
        return sql is not None and bool(CONSTANT_SQL.match(sql))
    return False


class _Scan(ast.NodeVisitor):
    def __init__(self, migration: str, tree: ast.Module) -> None:
        self.migration = migration
        self.consts = {
            t.id: n.value.value
            for n in tree.body
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
            for t in n.targets
            if isinstance(t, ast.Name) and isinstance(n.value.value, str)
        }
        self.created = {
            self._table(call.args[0])
            for call in ast.walk(tree)
            if isinstance(call, ast.Call) and _name(call.func) == "create_table" and call.args
        }
        self.batches: dict[str, str] = {}
        self.autocommit = 0
        self.hazards: list[Hazard] = []

    def _table(self, node: ast.expr | None) -> str:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name) and node.id in self.consts:
            return self.consts[node.id]
        return "?"  # computed: treated as an existing table

    def _flag(self, node: ast.AST, rule: str, table: str, why: str) -> None:
        if table not in self.created:
            self.hazards.append(Hazard(self.migration, rule, table, node.lineno, why))

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node.name != "downgrade":  # a downgrade is not part of an upgrade
            self.generic_visit(node)

    def visit_With(self, node: ast.With) -> None:
        entered = 0
        for item in node.items:
            expr = item.context_expr
            if isinstance(expr, ast.Call) and _name(expr.func) == "autocommit_block":
                entered += 1
            elif isinstance(expr, ast.Call) and _name(expr.func) == "batch_alter_table":
                if isinstance(item.optional_vars, ast.Name):
                    self.batches[item.optional_vars.id] = self._table(
                        expr.args[0] if expr.args else _keywords(expr).get("table_name")
                    )
        self.autocommit += entered
        self.generic_visit(node)
        self.autocommit -= entered

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        func, kw = node.func, _keywords(node)
        if not isinstance(func, ast.Attribute):
            return
        receiver = func.value.id if isinstance(func.value, ast.Name) else ""
        batch = self.batches.get(receiver)
        args = list(node.args) if batch is None else [ast.Constant(batch), *node.args]
        # the table of create_index / create_*_constraint (name first, then table)
        table = batch or self._table(args[1] if len(args) > 1 else kw.get("table_name"))
        if func.attr == "create_index":
            if not (_is_true(kw.get("postgresql_concurrently")) and self.autocommit):
                self._flag(
                    node, "index", table,
                    "CREATE INDEX blocks every write to the table for the whole build: "
                    "use create_index_online(...) (control_plane/migrations/online.py), or "
                    "postgresql_concurrently=True inside op.get_context().autocommit_block()",
                )  # fmt: skip
        elif func.attr == "add_column":
            table = self._table(args[0]) if args else "?"
            column = args[1] if len(args) > 1 else kw.get("column")
            self._add_column(node, table, column)
        elif func.attr == "alter_column":
            table = self._table(args[0]) if args else "?"
            if "type_" in kw or _is_false(kw.get("nullable")):
                self._flag(
                    node, "rewrite", table,
                    "a type change rewrites, SET NOT NULL scans, the table under ACCESS "
                    "EXCLUSIVE: add a new column, or a CHECK ... NOT VALID then VALIDATE",
                )  # fmt: skip
        elif func.attr in ("create_check_constraint", "create_foreign_key"):
            if not _is_true(kw.get("postgresql_not_valid")):
                self._flag(
                    node, "constraint", table,
                    "the constraint is checked against every row under the ALTER's lock: "
                    "add it with postgresql_not_valid=True and VALIDATE it in an "
                    "autocommit block",
                )  # fmt: skip
        elif func.attr in ("create_unique_constraint", "create_primary_key"):
            self._flag(
                node, "constraint", table,
                "builds its index under ACCESS EXCLUSIVE: build a unique index online, "
                "then ADD CONSTRAINT ... USING INDEX",
            )  # fmt: skip
        elif func.attr == "execute" and node.args:
            sql = _sql_text(node.args[0])
            match = WRITE_SQL.match(sql or "")
            if sql is not None and match and not KEYED_WHERE.search(sql):
                self._flag(
                    node, "backfill", match.group(1),
                    "one statement locks and rewrites every row it touches until it "
                    "commits: backfill in keyed batches, each committed, in an "
                    "autocommit block",
                )  # fmt: skip

    def _add_column(self, node: ast.Call, table: str, column: ast.expr | None) -> None:
        if not isinstance(column, ast.Call):
            self._flag(node, "not-null-default", table, "cannot read the column: use sa.Column")
            return
        kw = _keywords(column)
        if _is_true(kw.get("nullable")):
            return
        not_null = _is_false(kw.get("nullable")) or _is_true(kw.get("primary_key"))
        if _name(column.func) == "Column" and not not_null:
            return  # sa.Column is nullable unless told
        if not not_null:
            self._flag(
                node,
                "not-null-default",
                table,
                "say nullable=True, or NOT NULL with a constant server_default",
            )
        elif not _constant_default(kw.get("server_default")):
            self._flag(
                node, "not-null-default", table,
                "NOT NULL without a constant server_default rewrites the table under "
                "ACCESS EXCLUSIVE (or fails on rows already there): add it nullable, or "
                "with a literal server_default",
            )  # fmt: skip


def lock_hazards(migration: str, source: str) -> list[Hazard]:
    tree = ast.parse(source, migration)
    scan = _Scan(migration, tree)
    scan.visit(tree)
    return scan.hazards


def migrations() -> Iterator[Path]:
    return iter(sorted(VERSIONS.glob("0*.py")))


def all_hazards() -> list[Hazard]:
    return [h for path in migrations() for h in lock_hazards(path.stem, path.read_text())]


def test_no_migration_locks_a_live_table_for_its_duration() -> None:
    unexpected = [h for h in all_hazards() if (h.migration, h.rule, h.table) not in ACCEPTED]
    assert not unexpected, (
        "a migration would stall live traffic on a big table "
        "(docs/operations.md, 'Migrations'):\n" + "\n".join(map(str, unexpected))
    )


def test_every_accepted_exception_is_still_there() -> None:
    found = {(h.migration, h.rule, h.table) for h in all_hazards()}
    assert not set(ACCEPTED) - found, set(ACCEPTED) - found


HEADER = "from alembic import op\nimport sqlalchemy as sa\n\n"


@pytest.mark.parametrize(
    ("body", "rule", "table"),
    [
        ('    op.create_index("ix_r", "reservations", ["model"])\n', "index", "reservations"),
        (
            '    op.create_index("ix_r", "usage_records", ["model"],'
            " postgresql_concurrently=True)\n",
            "index",
            "usage_records",
        ),
        (
            "    with op.get_context().autocommit_block():\n"
            '        op.create_index("ix_l", "ledger_entries", ["kind"])\n',
            "index",
            "ledger_entries",
        ),
        (
            '    with op.batch_alter_table("audit_events") as batch:\n'
            '        batch.create_index("ix_a", ["actor"])\n',
            "index",
            "audit_events",
        ),
        (
            '    op.add_column("budget_periods", sa.Column("at", sa.DateTime(),'
            " nullable=False, server_default=sa.func.now()))\n",
            "not-null-default",
            "budget_periods",
        ),
        (
            '    op.add_column("reservations", sa.Column("n", sa.Integer(), nullable=False))\n',
            "not-null-default",
            "reservations",
        ),
        (
            '    op.add_column("reservations", sa.Column("u", sa.String(32), nullable=False,'
            ' server_default=sa.text("gen_random_uuid()")))\n',
            "not-null-default",
            "reservations",
        ),
        (
            '    op.alter_column("ledger_entries", "amount_micro", type_=sa.Numeric())\n',
            "rewrite",
            "ledger_entries",
        ),
        (
            '    op.create_foreign_key("fk", "usage_records", "reservations",'
            ' ["reservation_id"], ["id"])\n',
            "constraint",
            "usage_records",
        ),
        (
            "    op.execute(\"UPDATE reservations SET api_key_id = 'x'"
            ' WHERE api_key_id IS NULL")\n',
            "backfill",
            "reservations",
        ),
    ],
)
def test_a_migration_that_would_stall_traffic_fails(body: str, rule: str, table: str) -> None:
    hazards = lock_hazards("9999_bad", HEADER + "def upgrade() -> None:\n" + body)
    assert [(h.rule, h.table) for h in hazards] == [(rule, table)], hazards


def test_online_forms_pass() -> None:
    source = HEADER + (
        "from control_plane.migrations.online import create_index_online\n\n"
        "def upgrade() -> None:\n"
        '    op.create_table("things", sa.Column("id", sa.String(32), primary_key=True))\n'
        '    op.create_index("ix_things_id", "things", ["id"])\n'
        '    create_index_online("ix_r", "reservations", ["model"])\n'
        "    with op.get_context().autocommit_block():\n"
        '        op.create_index("ix_u", "usage_records", ["model"],'
        " postgresql_concurrently=True)\n"
        '    op.add_column("reservations", sa.Column("n", sa.Integer(), nullable=False,'
        ' server_default="0"))\n'
        '    op.add_column("reservations", sa.Column("note", sa.Text()))\n'
        '    op.create_check_constraint("ck", "reservations", "n >= 0",'
        " postgresql_not_valid=True)\n"
        '    op.execute(sa.text("UPDATE api_keys SET scopes = :s WHERE id = :id"))\n'
        "\n\ndef downgrade() -> None:\n"
        '    op.execute("DELETE FROM reservations")\n'
    )
    assert lock_hazards("9999_good", source) == []


def test_on_postgresql_index_builds_run_concurrently_outside_a_transaction(
    pg_database_url: str,
) -> None:
    """The same rule, observed: every CREATE INDEX a real upgrade sends on a table that
    existed before it is CONCURRENTLY and sent in autocommit, under the run's
    lock_timeout lifted for the build only (and statement_timeout off)."""
    from sqlalchemy import Engine, event

    from control_plane.migrate import upgrade

    sent: list[tuple[str, bool, str]] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("CREATE") and " INDEX " in statement.upper():
            settings = cursor.connection.execute(
                "SELECT current_setting('lock_timeout'), current_setting('statement_timeout')"
            ).fetchone()
            sent.append((statement, cursor.connection.autocommit, str(settings)))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        upgrade(pg_database_url)
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    concurrent = [s for s in sent if "CONCURRENTLY" in s[0]]
    assert len(concurrent) == 14, [s[0] for s in concurrent]
    assert {(autocommit, settings) for _, autocommit, settings in concurrent} == {
        (True, "('0', '0')")
    }
    others = {settings for statement, _, settings in sent if "CONCURRENTLY" not in statement}
    assert others == {"('5s', '0')"}


def test_two_migrate_runs_at_once_both_succeed(pg_database_url: str) -> None:
    """Two control planes booting together with LLMGW_AUTO_MIGRATE=1 (or two migrate
    jobs): before, the second waited inside `pg_advisory_lock`, holding a snapshot
    the first's CREATE INDEX CONCURRENTLY waited out while it waited for the first's
    lock; PostgreSQL broke the deadlock by failing the second run (exit 1)."""
    import os
    import subprocess
    import sys

    from control_plane.migrate import current, head

    env = {**os.environ, "LLMGW_DATABASE_URL": pg_database_url}
    command = [sys.executable, "-m", "llm_gateway.cli", "migrate"]
    runs = [
        subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errors = [run.communicate(timeout=180)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for err in errors]
    assert current(pg_database_url) == head()
