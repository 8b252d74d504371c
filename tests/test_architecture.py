"""The seams drawn in docs/architecture.md ("Seams"), read from the code: each module's
imports point down and never across, routes hold no SQL, the store's protocols import
none of its backends. A new arrow the wrong way round fails here, not in a review."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "control_plane", "stream_edge", "llm_gateway", "mock_llm")

# What each package may not import: the services talk to each other over HTTP only,
# shared/ serves both and knows neither, mock_llm stands in for vendors outside us.
FORBIDDEN = {
    "shared": ("control_plane", "stream_edge", "llm_gateway", "mock_llm"),
    "control_plane": ("stream_edge", "llm_gateway", "mock_llm"),
    "stream_edge": ("control_plane", "llm_gateway", "mock_llm"),
    "mock_llm": ("control_plane", "stream_edge", "llm_gateway"),
}

# SQL stays next to the tables: a route may name a session type for its one use case
# and catch a constraint error, nothing that builds or runs a statement.
ROUTE_SQL_IMPORTS_ALLOWED = {"sqlalchemy.exc", "sqlalchemy.orm"}
SQL_CALLS = {"execute", "exec", "scalar", "scalars", "add", "add_all", "flush", "merge"}
SQL_BUILDERS = {"select", "insert", "update", "delete", "text"}


def modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            yield dotted.removesuffix(".__init__"), path


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


MODULES = dict(modules())


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_never_across(module: str) -> None:
    package = module.split(".")[0]
    imported = imports_of(MODULES[module])
    wrong = sorted(
        name for name in imported for other in FORBIDDEN.get(package, ()) if under(name, other)
    )
    assert not wrong, f"{module} imports {wrong}"
    if package in ("control_plane", "stream_edge"):
        routes = f"{package}.routes"
        if not under(module, routes) and module != f"{package}.app":
            assert not [n for n in imported if under(n, routes)], (
                f"{module} imports the routes: only {package}.app wires them"
            )


def test_the_store_protocols_import_none_of_their_backends() -> None:
    imported = imports_of(MODULES["shared.store"])
    assert not [n for n in imported if n.startswith("shared.store_")], imported


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if m.startswith("control_plane.routes."))
)
def test_routes_hold_no_sql(module: str) -> None:
    path = MODULES[module]
    sql_imports = {
        n
        for n in imports_of(path)
        if (under(n, "sqlalchemy") or under(n, "sqlmodel"))
        and not any(under(n, ok) for ok in ROUTE_SQL_IMPORTS_ALLOWED)
    }
    assert not sql_imports, f"{module} imports {sorted(sql_imports)}"
    assert "hot_statements" not in path.read_text()
    calls = [
        node.func for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
    ]
    runs = [f.attr for f in calls if isinstance(f, ast.Attribute) and f.attr in SQL_CALLS]
    builds = [f.id for f in calls if isinstance(f, ast.Name) and f.id in SQL_BUILDERS]
    assert not runs and not builds, f"{module} runs or builds SQL: {runs + builds}"


def test_imports_are_read_from_both_import_forms(tmp_path: Path) -> None:
    """The checks above see `import x` and `from x import y` alike."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from control_plane.tables import Company\n"
        "from sqlmodel import select\n"
        "def f(session):\n    return session.execute(select(Company))\n"
    )
    assert under("control_plane.tables", "control_plane")
    assert {"control_plane.tables", "sqlmodel", "sqlmodel.select"} <= imports_of(bad)


def test_every_test_the_docs_name_exists() -> None:
    """The threat model answers each attack with a test: a renamed or moved test must
    take its row with it, or the table silently points at nothing."""
    import re

    missing = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for line in doc.read_text().splitlines():
            named = None
            for match in re.finditer(r"(test_\w+\.py)|::(\w+)", line):
                if match[1]:
                    named = ROOT / "tests" / match[1]
                    if not named.exists():
                        missing.append(f"{doc.name}: {match[1]}")
                elif named is not None and named.exists():
                    if f"def {match[2]}(" not in named.read_text():
                        missing.append(f"{doc.name}: {named.name}::{match[2]}")
    assert not missing, missing
