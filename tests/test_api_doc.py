"""`docs/api.md` is generated from the code and must match it; every setting the
code reads is documented in `.env.example` (issue 13.8: the repo explains itself)."""

from __future__ import annotations

import re

from llm_gateway import apidoc

PACKAGES = ("control_plane", "stream_edge", "shared", "llm_gateway", "mock_llm")
READ = re.compile(r"""["'](LLMGW_[A-Z0-9_]+)["']""")
# Read by tests and tools around the services, not by the services themselves.
NOT_SETTINGS = {"LLMGW_TEST_PG_DSN", "LLMGW_TEST_REDIS_URL"}


def test_the_api_reference_is_current() -> None:
    current = apidoc.OUTPUT.read_text(encoding="utf-8")
    assert current == apidoc.render(), "docs/api.md is stale: run python -m llm_gateway.apidoc"


def test_every_setting_the_code_reads_is_documented() -> None:
    read: set[str] = set()
    for package in PACKAGES:
        for path in (apidoc.ROOT / package).rglob("*.py"):
            read |= set(READ.findall(path.read_text(encoding="utf-8")))
    documented = {name for name, _, _, _ in apidoc.settings_documented()}
    assert read - NOT_SETTINGS - documented == set()


def test_each_variable_is_grouped_under_the_services_whose_settings_read_it() -> None:
    """`.env.example`'s "read by" groups cannot drift from the settings classes: a
    variable under a service is read by exactly that service's settings (both: by
    each), and one under any other reader (logging, the chat CLI) by neither."""
    read_by = apidoc.settings_read_by()
    documented = apidoc.settings_documented()
    marked = {name: reader for name, _, _, reader in documented}
    assert len(marked) == len(documented), "a variable is in .env.example twice"
    assert set(read_by) - set(marked) == set(), "read by a service, not in .env.example"
    for name, reader in marked.items():
        assert reader, f"{name} is above the first `# === read by … ===` group"
        expected = read_by.get(name)
        if expected is None:
            assert reader not in apidoc.SERVICES, f"{name}: no service's settings read it"
        else:
            assert reader == expected, f"{name} is under {reader!r}, read by {expected!r}"
    # The groups name every service, and the recording sees each side's own names.
    assert {read_by[n] for n in ("LLMGW_DATABASE_URL", "LLMGW_SPOOL_DIR")} == {
        "control plane",
        "edge",
    }
    assert read_by["LLMGW_WEBHOOK_SECRET"] == "both"


def test_the_reference_names_the_contract() -> None:
    text = apidoc.render()
    for needle in (
        "`/v1/chat/init`",
        "`/v1/stream`",
        "`/v1/chat/completions`",
        "`reservation_id`",
        "`llmgw_edge_streams_active`",
        "`llmgw_cp_chat_inits_total`",
        "`LLMGW_WEBHOOK_SECRET`",
    ):
        assert needle in text
