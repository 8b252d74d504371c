"""The catalog's `sse_backend` provider fields: defaults, overrides, validation."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from shared.catalog import CatalogError, SSEBackendSpec, parse_catalog

CATALOG: dict[str, Any] = {
    "default_model": "m",
    "providers": {
        "inhouse": {
            "api_type": "sse_backend",
            "base_url": "http://10.0.0.5:9000/",
            "service_token_env": "INHOUSE_TOKEN",
        }
    },
    "models": {
        "m": {
            "provider": "inhouse",
            "context_length": 10,
            "max_output_tokens": 5,
            "price": {"input_per_mtok": 1, "output_per_mtok": 2},
        }
    },
}


def test_sse_backend_provider_gets_defaults_and_overrides() -> None:
    provider = parse_catalog(CATALOG).providers["inhouse"]
    assert provider.sse == SSEBackendSpec()
    assert provider.base_url == "http://10.0.0.5:9000"
    doc = copy.deepcopy(CATALOG)
    doc["providers"]["inhouse"] |= {"path": "/v1/chat", "content_path": "choices.0.text"}
    provider = parse_catalog(doc).providers["inhouse"]
    assert provider.sse == SSEBackendSpec(path="/v1/chat", content_path="choices.0.text")
    doc["providers"]["other"] = {"api_type": "openai_chat", "base_url": "http://x"}
    assert parse_catalog(doc).providers["other"].sse is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"path": "chat"}, "providers.inhouse.path"),
        ({"path": "/a b"}, "providers.inhouse.path"),
        ({"path": 3}, "providers.inhouse.path must be a string"),
        ({"content_path": "a..b"}, "providers.inhouse.content_path"),
        ({"usage_input_path": ""}, "providers.inhouse.usage_input_path"),
        ({"finish_path": "a b"}, "providers.inhouse.finish_path"),
        ({"error_path": ["e"]}, "providers.inhouse.error_path"),
        ({"api_type": "openai_chat", "content_path": "x"}, "sse_backend only"),
    ],
)
def test_sse_backend_fields_are_validated(changes: dict[str, Any], message: str) -> None:
    doc = copy.deepcopy(CATALOG)
    doc["providers"]["inhouse"] |= changes
    with pytest.raises(CatalogError, match=message):
        parse_catalog(doc)


@pytest.mark.parametrize("value", [0, -1, 2**31, "3000", True, 1.5])
def test_token_counts_per_image_are_validated(value: Any) -> None:
    doc = copy.deepcopy(CATALOG)
    model = next(iter(doc["models"]))
    doc["models"][model]["image_input_tokens"] = value
    with pytest.raises(CatalogError, match=f"models.{model}.image_input_tokens"):
        parse_catalog(doc)
