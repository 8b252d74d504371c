"""The gateway in front of one mock that speaks every vendor's format, for adapter tests.

Modelled on `tests.stack.InProcessStack`, with a test-local catalog: it is written
after the sockets are bound, so its providers can point at this run's mock. Each
wire format gets a provider with the right credentials and models whose
`upstream_model` (`mock-fast`, the name the "vendor" knows) differs from our id; the
`*-badkey` / `*-nokey` / `*-notoken` models reach the same mock with wrong or missing
credentials.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import yaml

from control_plane.app import create_app as control_plane_app
from llm_gateway.dev import settings_from_env
from mock_llm.app import create_app as mock_app
from shared.store_memory import MemoryStore
from stream_edge.app import create_app as edge_app
from tests.harness import ServerGroup, bind_free_socket, url_of
from tests.stack import Client

VENDOR_KEY = "vendor-key-" + uuid.uuid4().hex
WRONG_KEY = "wrong-key-" + uuid.uuid4().hex
SERVICE_TOKEN = "service-token-" + uuid.uuid4().hex
KEY_ENV = {
    "ADAPTER_TEST_VENDOR_KEY": VENDOR_KEY,
    "ADAPTER_TEST_WRONG_KEY": WRONG_KEY,
    "ADAPTER_TEST_SERVICE_TOKEN": SERVICE_TOKEN,
}
# Our model id → (provider, api_type).
MODELS = {
    "claude-test": ("mock-anthropic", "anthropic_messages"),
    "gemini-test": ("mock-gemini", "gemini"),
    "gpt-test": ("mock-openai", "openai_chat"),
    "inhouse-test": ("mock-inhouse", "sse_backend"),
    "claude-badkey": ("mock-anthropic-badkey", "anthropic_messages"),
    "gemini-badkey": ("mock-gemini-badkey", "gemini"),
    "gemini-nokey": ("mock-gemini-nokey", "gemini"),
    "gpt-badkey": ("mock-openai-badkey", "openai_chat"),
    "inhouse-notoken": ("mock-inhouse-notoken", "sse_backend"),
}


def _provider(api_type: str, mock_url: str, credential: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"api_type": api_type, "base_url": mock_url}
    if api_type == "openai_chat":
        spec["base_url"] = f"{mock_url}/v1"
    if api_type == "sse_backend":
        spec["path"] = "/sse/chat"
        if credential:
            spec["service_token_env"] = "ADAPTER_TEST_SERVICE_TOKEN"
    elif credential:
        spec["api_key_env"] = credential
    return spec


# Cache reads cheaper and cache writes dearer than plain input, as the vendors price them.
PRICE = {
    "input_per_mtok": "1.0",
    "output_per_mtok": "2.0",
    "cached_input_per_mtok": "0.1",
    "cache_write_per_mtok": "1.25",
}
_MEDIA = ["streaming", "tools", "vision", "files"]
FEATURES = {
    "anthropic_messages": _MEDIA,  # Anthropic takes no audio
    "gemini": [*_MEDIA, "audio"],
    "openai_chat": ["streaming", "tools"],
    "sse_backend": ["streaming", "tools"],
}


def catalog(mock_url: str) -> dict[str, Any]:
    providers: dict[str, Any] = {}
    for provider, api_type in MODELS.values():
        credential = None
        if provider.endswith("-badkey"):
            credential = "ADAPTER_TEST_WRONG_KEY"
        elif not provider.endswith(("-nokey", "-notoken")):
            credential = "ADAPTER_TEST_VENDOR_KEY"
        providers[provider] = _provider(api_type, mock_url, credential)
    models = {
        model_id: {
            "provider": provider,
            "upstream_model": "mock-fast",
            "context_length": 8192,
            "max_output_tokens": 1024,
            "features": FEATURES[api_type],
            "price": PRICE,
        }
        for model_id, (provider, api_type) in MODELS.items()
    }
    return {"default_model": "claude-test", "providers": providers, "models": models}


class AdapterStack:
    """`edge_changes`: edge settings to set past what the environment allows (a
    stream life under the 10 s minimum, say), given to the edge's factory as is."""

    def __init__(
        self, env: dict[str, str], workdir: Path, *, edge_changes: dict[str, Any] | None = None
    ) -> None:
        mock_sock, cp_sock, edge_sock = (bind_free_socket() for _ in range(3))
        models_file = workdir / "models.yaml"
        models_file.write_text(yaml.safe_dump(catalog(url_of(mock_sock))))
        env = {
            **env,
            **KEY_ENV,
            "LLMGW_MODELS_FILE": str(models_file),
            "LLMGW_CONTROL_PLANE_URL": url_of(cp_sock),
            "LLMGW_EDGE_PUBLIC_URL": url_of(edge_sock),
        }
        self.settings, edge_settings = settings_from_env(env)
        self.edge_settings = dataclasses.replace(edge_settings, **(edge_changes or {}))
        store = self.store = MemoryStore()  # shared by both services, as Redis would be
        self.mock = mock_app(api_key=VENDOR_KEY, service_token=SERVICE_TOKEN)
        self.group = ServerGroup(
            [
                (self.mock, mock_sock),
                (control_plane_app(self.settings, store), cp_sock),
                (edge_app(self.edge_settings, store), edge_sock),
            ]
        )
        self.client = Client(
            url_of(cp_sock), url_of(edge_sock), url_of(mock_sock), env["LLMGW_WEBHOOK_SECRET"]
        )

    def upstream_requests(self) -> list[dict[str, Any]]:
        """What the mock received (path, query, headers, body), oldest first."""
        requests: list[dict[str, Any]] = self.client.http.get(
            f"{self.client.mock_url}/_mock/requests"
        ).json()["requests"]
        return requests

    def __enter__(self) -> AdapterStack:
        self.group.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.group.stop()
