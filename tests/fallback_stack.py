"""The gateway in front of two mocks, with a catalog of fallback chains and key pools
(issue 16), for `test_fallbacks_e2e.py`.

One mock takes any key (the chains' backends: each failure mode is its own upstream
model, `MOCK_MODELS`, on its own provider so that one test's resting keys never
touch another's); the other checks its key (`VENDOR_KEY`), for the key pools.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import yaml

from control_plane.app import create_app as control_plane_app
from llm_gateway.dev import settings_from_env
from mock_llm.app import create_app as mock_app
from mock_llm.script import MockBehaviour
from shared.store_factory import open_store
from shared.store_memory import MemoryStore
from stream_edge.app import create_app as edge_app
from tests.harness import ServerGroup, bind_free_socket, url_of
from tests.stack import Client

VENDOR_KEY = "vendor-key-" + uuid.uuid4().hex
WRONG_KEY = "wrong-key-" + uuid.uuid4().hex
KEY_ENV = {
    "FB_TEST_VENDOR_KEY": VENDOR_KEY,
    "FB_TEST_WRONG_KEY": WRONG_KEY,
    "FB_TEST_KEY_A": "key-a-" + uuid.uuid4().hex,
    "FB_TEST_KEY_B": "key-b-" + uuid.uuid4().hex,
}
TPM_LIMIT = 3000
MOCK_MODELS = {
    "ok": MockBehaviour(tokens=8),
    "down": MockBehaviour(tokens=8, fail_status=503),
    "refuses": MockBehaviour(tokens=8, fail_status=400),
    "too-large": MockBehaviour(tokens=8, fail_status=413),
    "limited": MockBehaviour(tokens=8, fail_status=429, retry_after_s=30),
    "slow": MockBehaviour(tokens=8, first_token_delay_s=30),
    # A vendor organization's tokens-per-minute limit: a request asking more on its
    # own is refused with the vendor's 429 on every key (`mock_llm.rate_limits`).
    "tpm": MockBehaviour(tokens=8, tpm_limit=TPM_LIMIT),
}
# Our model id → (provider, upstream model, input price, output price).
FIRST = {
    "first-down": ("p-down", "down", 1, 1),
    "first-dead": ("p-dead", "ok", 10, 20),
    "first-limited": ("p-limited", "limited", 10, 20),
    "first-slow": ("p-slow", "slow", 10, 20),
    "first-refuses": ("p-refuses", "refuses", 10, 20),
    "first-too-large": ("p-refuses", "too-large", 10, 20),
    "first-breaks": ("p-breaks", "ok", 10, 20),
}
CLAUDE_PRICE = (3, 6)


def _model(provider: str, upstream: str, price: tuple[int, int], **extra: Any) -> dict[str, Any]:
    return {
        "provider": provider,
        "upstream_model": upstream,
        "context_length": 8192,
        "max_output_tokens": 1024,
        "features": ["streaming", "tools"],
        "price": {"input_per_mtok": price[0], "output_per_mtok": price[1]},
        **extra,
    }


def catalog(open_url: str, strict_url: str, dead_url: str) -> dict[str, Any]:
    def openai(url: str, **extra: Any) -> dict[str, Any]:
        return {"api_type": "openai_chat", "base_url": f"{url}/v1", **extra}

    providers = {
        "p-down": openai(open_url),
        "p-dead": openai(dead_url),
        "p-limited": openai(open_url, api_key_envs=["FB_TEST_KEY_A", "FB_TEST_KEY_B"]),
        "p-slow": openai(open_url),
        "p-refuses": openai(open_url),
        "p-breaks": openai(open_url),
        "p-cheap": openai(open_url),
        "p-claude": {"api_type": "anthropic_messages", "base_url": open_url},
        "p-pool": openai(strict_url, api_key_envs=["FB_TEST_WRONG_KEY", "FB_TEST_VENDOR_KEY"]),
        # Two good platform keys every tenant's streams share.
        "p-shared": openai(open_url, api_key_envs=["FB_TEST_KEY_A", "FB_TEST_KEY_B"]),
        # The same, in front of a per-minute token limit, in OpenAI's and Google's words.
        "p-tpm": openai(open_url, api_key_envs=["FB_TEST_KEY_A", "FB_TEST_KEY_B"]),
        "p-tpm-gemini": {
            "api_type": "gemini",
            "base_url": open_url,
            "api_key_envs": ["FB_TEST_KEY_A", "FB_TEST_KEY_B"],
        },
    }
    models = {
        model_id: _model(provider, upstream, (pin, pout), fallbacks=["claude-ok"])
        for model_id, (provider, upstream, pin, pout) in FIRST.items()
    }
    # More output than its fallback allows: the fallback gets its own, smaller cap.
    models["first-big"] = _model(
        "p-down", "down", (1, 1), fallbacks=["claude-ok"], context_length=16384,
        max_output_tokens=4096,
    )  # fmt: skip
    models["claude-ok"] = _model("p-claude", "ok", CLAUDE_PRICE)
    models["gpt-cheap"] = _model("p-cheap", "ok", (0, 0))
    models["pooled"] = _model("p-pool", "ok", (1, 1))
    models["shared"] = _model("p-shared", "ok", (1, 1))
    models["tpm-openai"] = _model("p-tpm", "tpm", (1, 1))
    models["tpm-gemini"] = _model("p-tpm-gemini", "tpm", (1, 1))
    return {"default_model": "claude-ok", "providers": providers, "models": models}


class FallbackStack:
    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        open_sock, strict_sock, cp_sock, edge_sock = (bind_free_socket() for _ in range(4))
        dead = bind_free_socket()
        dead_url = url_of(dead)
        dead.close()  # nothing listens there: connections are refused
        models_file = workdir / "models.yaml"
        models_file.write_text(
            yaml.safe_dump(catalog(url_of(open_sock), url_of(strict_sock), dead_url))
        )
        env = {
            **env,
            **KEY_ENV,
            "LLMGW_MODELS_FILE": str(models_file),
            "LLMGW_CONTROL_PLANE_URL": url_of(cp_sock),
            "LLMGW_EDGE_PUBLIC_URL": url_of(edge_sock),
            "LLMGW_UPSTREAM_RETRIES": "0",
            "LLMGW_FIRST_TOKEN_TIMEOUT_SECONDS": "1",
            "LLMGW_BREAKER_FAILURES": "1000",
        }
        self.settings, self.edge_settings = settings_from_env(env)
        # With LLMGW_REDIS_URL each app opens its own Redis store, as processes would.
        store = None if self.settings.redis_url else MemoryStore()
        self.group = ServerGroup(
            [
                (mock_app(models=MOCK_MODELS), open_sock),
                (mock_app(api_key=VENDOR_KEY, models=MOCK_MODELS), strict_sock),
                (control_plane_app(self.settings, store), cp_sock),
                (edge_app(self.edge_settings, store), edge_sock),
            ]
        )
        self.client = Client(
            url_of(cp_sock), url_of(edge_sock), url_of(open_sock), env["LLMGW_WEBHOOK_SECRET"]
        )
        self.strict_url = url_of(strict_sock)

    def store_set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        """Write a key into the apps' store, from the test's thread."""

        async def run() -> None:
            store = open_store(self.settings.redis_url, prefix=self.settings.redis_prefix)
            try:
                await store.set(key, value, ttl_seconds)
            finally:
                await store.close()

        assert self.settings.redis_url, "the stack shares Redis with the test"
        asyncio.run(run())

    def store_get(self, key: str) -> bytes | None:
        """Read a key of the apps' store, from the test's thread."""

        async def run() -> bytes | None:
            store = open_store(self.settings.redis_url, prefix=self.settings.redis_prefix)
            try:
                return await store.get(key)
            finally:
                await store.close()

        assert self.settings.redis_url, "the stack shares Redis with the test"
        return asyncio.run(run())

    def requests(self, mock_url: str | None = None) -> list[dict[str, Any]]:
        """What a mock received (path, query, headers, body), oldest first."""
        url = mock_url or self.client.mock_url
        found: list[dict[str, Any]] = self.client.http.get(f"{url}/_mock/requests").json()[
            "requests"
        ]
        return found

    def __enter__(self) -> FallbackStack:
        self.group.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.group.stop()
