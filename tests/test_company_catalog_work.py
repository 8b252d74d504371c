"""What a company's model overrides cost each request that reads its catalog: every
init (and every `GET /v1/models`, every agent listing) merged each override anew, a
one-model catalog parse apiece, on the threads whose CPU the control plane's event
loop shares (the GIL). An owner's 5 providers x 200 models made each init of its
members cost ~90 ms, and 5 at once held the loop up to 0.6 s. An override is merged
once per content, whatever the requests that read it."""

from __future__ import annotations

from typing import Any

import pytest

from control_plane import company_llm
from shared import catalog
from tests.test_control_plane import CP, cp, data_of

__all__ = ["cp"]

MODELS = 200


def test_a_companys_overrides_are_merged_once_not_on_every_read(
    cp: CP, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, company_id = cp.owner_client("10")
    models = {
        f"house-{i}": {
            "upstream_model": "mock-chat",
            "context_length": 4096,
            "max_output_tokens": 64,
            "features": ["streaming"],
            "price": {"input_per_mtok": "1", "output_per_mtok": "1"},
            "fallbacks": [f"house-{(i + 1) % MODELS}"],
        }
        for i in range(MODELS)
    }
    body = {"api_key": "sk-company-mock-key", "default_model": "house-0", "models": models}
    data_of(client.put(f"/v1/admin/companies/{company_id}/providers/mock", json=body))

    parses: list[Any] = []
    parse = catalog.parse_catalog

    def counted(raw: Any, **kw: Any) -> Any:
        parses.append(raw)
        return parse(raw, **kw)

    monkeypatch.setattr(company_llm, "parse_catalog", counted)
    views: list[str | None] = []
    view = company_llm.company_catalog

    def counted_view(base: Any, overrides: Any, default: str | None, keyed: Any) -> Any:
        views.append(default)
        return view(base, overrides, default, keyed)

    monkeypatch.setattr(company_llm, "company_catalog", counted_view)
    for _ in range(4):
        init = data_of(client.post("/v1/chat/init", json={"query": "hi"}), 201)
        assert init["model"] == "house-0"
    # Init merges the company's view once per cached configuration, not per init.
    assert len(views) <= 1, f"the company's catalog merged {len(views)} times for 4 inits"
    for _ in range(2):
        listed = data_of(client.get("/v1/models"))["models"]
        assert {f"house-{i}" for i in range(MODELS)} <= {m["id"] for m in listed}
    # Before: each of the 6 reads merged all 200 (1,200+ parses).
    assert len(parses) <= MODELS, f"{len(parses)} overrides merged for 6 reads of {MODELS}"
