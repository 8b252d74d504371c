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
    documented = {name for name, _, _ in apidoc.settings_documented()}
    assert read - NOT_SETTINGS - documented == set()


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
