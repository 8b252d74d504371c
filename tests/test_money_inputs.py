"""Nobody streams for free: whatever goes upstream is priced before it is sent.

Attacks through real servers (control plane + edge + a recording OpenAI-compatible
backend, each on uvicorn): zero-price overrides riding the platform's key (11.1),
image/file parts outside the estimate (11.2), tools and other parameters outside
the estimate (12.4), JSON nested past what can be stored (12.5), a provider key that
cannot travel in an HTTP header (11.13). The backend reports a realistic usage
(`_true_prompt_tokens`); the charge must then be exactly that usage's price, never
capped by a hold that did not cover it.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import sqlite3
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from control_plane import catalog_cache
from control_plane.company_llm import company_catalog, route_for
from control_plane.tables import CompanyModel
from shared.catalog import load_catalog
from shared.input_size import (
    IMAGE_TOKENS,
    MAX_JSON_DEPTH,
    InputRates,
    InputRejected,
    carries_files,
    check_parts,
    estimate_input_tokens,
    input_rates,
    json_too_deep,
    params_tokens,
)
from shared.store_memory import MemoryStore
from tests.backend_gateway import PLATFORM_KEY, gateway_before
from tests.harness import ServerGroup
from tests.pdf_samples import as_file_part, objstm_pdf
from tests.stack import Client, micro

COMPANY_KEY = "sk-company-own-key"
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
FILE = {"type": "file", "file": {"filename": "a.pdf", "file_data": "JVBERi0x" * 64}}
PDF_PLAIN = base64.b64encode(objstm_pdf(1)).decode()


def _true_prompt_tokens(body: dict[str, Any]) -> int:
    """What a vendor would bill: ~4 bytes a token for everything that is not a
    message, the message text, OpenAI's 1445 tokens (85 + 170 x 8 tiles) per
    high-detail image, one token per 3 bytes of file data."""
    rest = {k: v for k, v in body.items() if k not in ("messages", "model", "stream")}
    rest.pop("stream_options", None)
    rest.pop("max_tokens", None)
    tokens = math.ceil(len(orjson.dumps(rest)) / 4) if rest else 0
    for message in body["messages"]:
        tokens += 3
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if part["type"] == "text":
                tokens += math.ceil(len(part["text"].encode()) / 4)
            elif part["type"] == "image_url":
                tokens += 1445
            elif part["type"] == "file":
                tokens += math.ceil(len(part["file"].get("file_data", "")) / 3)
    return tokens


class Backend:
    """An OpenAI-compatible backend that records what reached it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def chat(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.calls.append((request.headers.get("authorization", ""), body))
        usage = {"prompt_tokens": _true_prompt_tokens(body), "completion_tokens": 2}
        usage["total_tokens"] = usage["prompt_tokens"] + 2
        if not body.get("stream"):
            message = {"role": "assistant", "content": "ok!"}
            return JSONResponse(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": usage,
                }
            )

        def chunk(choices: list[Any], **extra: Any) -> bytes:
            doc = {"id": "c1", "object": "chat.completion.chunk", "model": body["model"]}
            return b"data: " + orjson.dumps({**doc, "choices": choices, **extra}) + b"\n\n"

        frames = [
            chunk([{"index": 0, "delta": {"role": "assistant", "content": "ok"}}]),
            chunk([{"index": 0, "delta": {"content": "!"}}]),
            chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
            chunk([], usage=usage),
            b"data: [DONE]\n\n",
        ]
        return Response(b"".join(frames), media_type="text/event-stream")


@dataclasses.dataclass
class Gateway:
    client: Client
    backend: Backend
    db_path: Path
    store: MemoryStore
    servers: ServerGroup


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp: Path = tmp_path_factory.mktemp("money")
    backend = Backend()
    with gateway_before(f"sqlite:///{tmp}/gw.db", backend.chat) as (client, store, servers):
        yield Gateway(client, backend, tmp / "gw.db", store, servers)


def _owner(gw: Gateway) -> tuple[str, str]:
    company_id = gw.client.new_company("10")
    return company_id, gw.client.new_user(company_id, role="owner")


def _put(gw: Gateway, token: str, company_id: str, provider: str, body: Any) -> httpx.Response:
    path = f"/v1/admin/companies/{company_id}/providers/{provider}"
    return gw.client.as_user(token, "PUT", path, json=body)


def _stream(gw: Gateway, init: dict[str, Any]) -> str:
    """Run the stashed request through `GET /v1/stream` to its end."""
    response = gw.client.http.get(init["stream_url"])
    assert response.status_code == 200, response.text
    assert "event: complete" in response.text, response.text
    return response.text


def _completions(gw: Gateway, stream_token: str, body: dict[str, Any]) -> httpx.Response:
    return gw.client.http.post(
        f"{gw.client.edge_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {stream_token}"},
        json=body,
    )


def _cost(prompt: int, output: int, price_in: str, price_out: str) -> int:
    return math.ceil(prompt * Decimal(price_in) + output * Decimal(price_out))


def _state(gw: Gateway, token: str) -> tuple[dict[str, str], int]:
    sessions = gw.client.as_user(token, "GET", "/v1/sessions").json()["data"]["items"]
    return gw.client.credits(token), len(sessions)


def _edge_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"], error


def _cp_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    doc = response.json()
    assert doc["success"] is False and doc["error"]["code"] == code, doc
    message: str = doc["message"]
    return message


# --- 11.1 zero-price overrides on the platform's key -----------------------------------

PRICE_ZERO = {"price": {"input_per_mtok": "0", "output_per_mtok": "0"}}
NEW_MODEL = {
    "upstream_model": "gpt-4o",
    "context_length": 128000,
    "max_output_tokens": 1000,
    **PRICE_ZERO,
}


@pytest.mark.parametrize(
    ("models", "field"),
    [
        ({"gpt-4o-mini": PRICE_ZERO}, "models.gpt-4o-mini.price"),
        # 15.3: free cache reads are a price override too.
        ({"gpt-4o-mini": {"price": {"cached_input_per_mtok": "0", "cache_write_per_mtok": "0"}}},
         "models.gpt-4o-mini.price"),
        ({"gpt-4o-mini": {"upstream_model": "gpt-4o"}}, "models.gpt-4o-mini.upstream_model"),
        ({"gpt-4o-mini": {"features": ["streaming", "vision", "files"]}},
         "models.gpt-4o-mini.features"),
        ({"free-4o": NEW_MODEL}, "models.free-4o"),
        # Review 5: what an image is held at is a price too.
        ({"gpt-4o-mini": {"image_input_tokens": 1}}, "models.gpt-4o-mini.image_input_tokens"),
    ],
)  # fmt: skip
def test_price_model_and_additions_need_the_companys_own_key(
    gw: Gateway, models: dict[str, Any], field: str
) -> None:
    company_id, token = _owner(gw)
    # On the platform's key: refused, nothing stored.
    message = _cp_error(
        _put(gw, token, company_id, "openai", {"models": models}), 422, "validation_error"
    )
    assert message.startswith(field) and "own api_key" in message
    listed = gw.client.as_user(token, "GET", f"/v1/admin/companies/{company_id}/providers")
    assert listed.json()["data"]["items"] == []
    # A key given as null (the platform's) is the same.
    body = {"api_key": None, "models": models}
    _cp_error(_put(gw, token, company_id, "openai", body), 422, "validation_error")
    # With the company's own key in the same request: accepted.
    body = {"api_key": COMPANY_KEY, "models": models}
    assert _put(gw, token, company_id, "openai", body).status_code == 200
    # Already stored key: accepted too.
    assert _put(gw, token, company_id, "openai", {"models": models}).status_code == 200
    # Clearing the key while keeping such overrides: refused.
    body = {"api_key": None, "models": models}
    _cp_error(_put(gw, token, company_id, "openai", body), 422, "validation_error")


def test_limits_and_hiding_stay_allowed_on_the_platforms_key(gw: Gateway) -> None:
    company_id, token = _owner(gw)
    models = {"gpt-4o-mini": {"max_output_tokens": 100}, "mock-chat": {"enabled": False}}
    r = _put(gw, token, company_id, "openai", {"models": {"gpt-4o-mini": models["gpt-4o-mini"]}})
    assert r.status_code == 200, r.text
    r = _put(gw, token, company_id, "mock", {"models": {"mock-chat": models["mock-chat"]}})
    assert r.status_code == 200, r.text
    init = gw.client.init_ok(token, {"model": "gpt-4o-mini", "query": "hi"})
    assert init["max_tokens"] == 100


def test_zero_price_override_rides_the_platform_key_for_free(gw: Gateway) -> None:
    """The attack of 11.1, end to end: overrides stored while the company had a key
    (or by an older version) must not apply once the platform's key serves."""
    company_id, token = _owner(gw)
    models = {"gpt-4o-mini": PRICE_ZERO, "free-4o": NEW_MODEL}
    r = _put(gw, token, company_id, "openai", {"api_key": COMPANY_KEY, "models": models})
    assert r.status_code == 200, r.text
    # With its own key the company may price its own traffic as it likes.
    own = gw.client.init_ok(token, {"model": "free-4o", "query": "hi", "max_tokens": 16})
    assert own["reserved_credits"] == "0.000000"
    gw.backend.calls.clear()
    _stream(gw, own)
    assert gw.backend.calls[0][0] == f"Bearer {COMPANY_KEY}"
    assert gw.backend.calls[0][1]["model"] == "gpt-4o"

    # The key goes (DELETE of the key only, overrides left in place): back on the
    # platform's key, the packaged price and model apply, the added model is gone.
    stored = gw.client.as_user(
        token, "PUT", f"/v1/admin/companies/{company_id}/providers/openai",
        json={"api_key": None},
    )  # fmt: skip
    assert stored.status_code in (200, 422), stored.text
    if stored.status_code == 422:
        # The PUT refuses to leave priced overrides without a key; drop the key the
        # way an older version (or a decryption-key loss) would: directly.
        _forget_key(gw, company_id)
    init = gw.client.init(token, {"model": "free-4o", "query": "hi"})
    _cp_error(init, 404, "model_not_found")
    init = gw.client.init_ok(token, {"model": "gpt-4o-mini", "query": "x" * 1500, "max_tokens": 16})
    assert micro(init["reserved_credits"]) > 0
    gw.backend.calls.clear()
    _stream(gw, init)
    auth, body = gw.backend.calls[0]
    assert auth == f"Bearer {PLATFORM_KEY}" and body["model"] == "gpt-4o-mini"
    usage = gw.client.wait_usage(token, init["reservation_id"])
    expected = _cost(_true_prompt_tokens(body), 2, "0.15", "0.6")
    assert micro(usage["cost"]) == expected > 0


def _forget_key(gw: Gateway, company_id: str) -> None:
    """Clear the stored key without going through the PUT's checks, and tell the
    control plane's config cache (`catalog_cache`) as a committed change would."""
    with sqlite3.connect(gw.db_path) as conn:
        conn.execute(
            "UPDATE company_providers SET api_key_encrypted = NULL WHERE company_id = ?",
            (company_id,),
        )
    conn.close()
    gw.servers.call(lambda: catalog_cache.invalidate(gw.store, company_id))


# --- 11.13 provider keys that cannot travel in a header --------------------------------


def test_provider_key_must_be_printable_ascii(gw: Gateway) -> None:
    company_id, token = _owner(gw)
    for key in ["sk-ключ", "sk-tab\there", "sk-\u00e9", "k" * 5000, "", " "]:
        response = _put(gw, token, company_id, "openai", {"api_key": key})
        assert _cp_error(response, 422, "validation_error").startswith("api_key"), key
    # NUL is refused for every body before any field is read (DESIGN §11).
    nul = _put(gw, token, company_id, "openai", {"api_key": "sk-nul\u0000"})
    _cp_error(nul, 400, "invalid_characters")
    listed = gw.client.as_user(token, "GET", f"/v1/admin/companies/{company_id}/providers")
    assert listed.json()["data"]["items"] == []
    assert _put(gw, token, company_id, "openai", {"api_key": "sk-" + "Az09_-.~" * 8}).is_success


# --- 11.2 images and files ride free ---------------------------------------------------


def test_a_companys_own_model_features_travel_to_the_edge(gw: Gateway) -> None:
    """With its own key a company may let a model take images: init and the edge (which
    reads the features from the sealed route) agree; without a key they both refuse."""
    company_id, token = _owner(gw)
    body = {"api_key": COMPANY_KEY, "models": {"mock-fast": {"features": ["streaming", "vision"]}}}
    assert _put(gw, token, company_id, "mock", body).status_code == 200
    init = gw.client.init_ok(token, {"model": "mock-fast", "max_tokens": 16, **_parts_body(1)})
    gw.backend.calls.clear()
    response = _completions(gw, init["stream_token"], _parts_body(1))
    assert response.status_code == 200, response.text
    assert gw.backend.calls[0][0] == f"Bearer {COMPANY_KEY}"
    _, other = _owner(gw)
    response = gw.client.init(other, {"model": "mock-fast", "max_tokens": 16, **_parts_body(1)})
    _cp_error(response, 400, "unsupported_content")


def _parts_body(images: int, files: int = 0, text: str = "hi") -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [IMAGE] * images + [FILE] * files
    return {"messages": [{"role": "user", "content": parts}]}


def test_images_and_files_refused_for_a_text_model_at_the_edge(gw: Gateway) -> None:
    _, token = _owner(gw)
    init = gw.client.init_ok(token, {"query": "hi", "max_tokens": 16})
    gw.backend.calls.clear()
    response = _completions(gw, init["stream_token"], _parts_body(50, files=1))
    _edge_error(response, 400, "unsupported_content")
    assert gw.backend.calls == []
    # The refusal did not burn the token: a plain request still runs.
    ok = _completions(gw, init["stream_token"], {"messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200, ok.text


def test_images_on_a_vision_model_must_fit_the_tokens_input(gw: Gateway) -> None:
    _, token = _owner(gw)
    init = gw.client.init_ok(token, {"model": "gpt-4o-mini", "query": "hi", "max_tokens": 16})
    gw.backend.calls.clear()
    response = _completions(gw, init["stream_token"], _parts_body(50))
    _edge_error(response, 413, "input_too_large")
    # gpt-4o-mini does not list `files`.
    response = _completions(gw, init["stream_token"], _parts_body(0, files=1))
    _edge_error(response, 400, "unsupported_content")
    assert gw.backend.calls == []


def test_parts_at_init_are_refused_or_held_for(gw: Gateway) -> None:
    _, token = _owner(gw)
    before = _state(gw, token)
    # A text-only model: 400 and nothing changes.
    response = gw.client.init(token, {"model": "mock-fast", **_parts_body(2)})
    _cp_error(response, 400, "unsupported_content")
    response = gw.client.init(token, {"model": "gpt-4o-mini", **_parts_body(1, files=1)})
    _cp_error(response, 400, "unsupported_content")
    assert _state(gw, token) == before
    # A vision model: the hold covers every image, and the stream is billed in full.
    # gpt-4o-mini prices an image at up to 48169 tokens: three do not fit its context.
    response = gw.client.init(token, {"model": "gpt-4o-mini", "max_tokens": 16, **_parts_body(3)})
    _cp_error(response, 413, "input_too_large")
    assert _state(gw, token) == before
    init = gw.client.init_ok(token, {"model": "gpt-4o-mini", "max_tokens": 16, **_parts_body(2)})
    assert micro(init["reserved_credits"]) >= _cost(2 * 48169, 16, "0.15", "0.6")
    gw.backend.calls.clear()
    _stream(gw, init)
    body = gw.backend.calls[0][1]
    assert [p["type"] for p in body["messages"][0]["content"]] == ["text"] + ["image_url"] * 2
    usage = gw.client.wait_usage(token, init["reservation_id"])
    assert usage["input_tokens"] == _true_prompt_tokens(body) > 2 * 1445
    assert micro(usage["cost"]) == _cost(usage["input_tokens"], 2, "0.15", "0.6")
    # The same images sent at the edge with that token fit its input allowance.
    init = gw.client.init_ok(token, {"model": "gpt-4o-mini", "max_tokens": 16, **_parts_body(2)})
    response = _completions(gw, init["stream_token"], _parts_body(2))
    assert response.status_code == 200, response.text


# --- 12.4 tools and parameters ride free -----------------------------------------------


GARBAGE_IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,<b>hi</b>"}}
SVG_IMAGE = {"type": "image_url", "image_url": {"url": "data:image/svg+xml;base64,PHN2Zz4="}}


def test_garbage_media_is_refused_at_init_and_edge(gw: Gateway) -> None:
    """15.2: a `data:` URL is parsed strictly (media type whitelist, canonical base64)
    before anything is held or sent; a vendor never gets garbage to choke on."""
    _, token = _owner(gw)
    before = _state(gw, token)
    for part, status, code in ((GARBAGE_IMAGE, 422, "validation_error"),
                               (SVG_IMAGE, 400, "unsupported_content")):  # fmt: skip
        content = [{"type": "text", "text": "x"}, part]
        body = {"model": "gpt-4o-mini", "max_tokens": 16,
                "messages": [{"role": "user", "content": content}]}  # fmt: skip
        message = _cp_error(gw.client.init(token, body), status, code)
        assert "image_url" in message, message
    assert _state(gw, token) == before
    init = gw.client.init_ok(token, {"model": "gpt-4o-mini", "max_tokens": 16, "query": "hi"})
    gw.backend.calls.clear()
    for part, code in ((GARBAGE_IMAGE, "invalid_messages"), (SVG_IMAGE, "unsupported_content")):
        body = {"messages": [{"role": "user", "content": [part]}]}
        _edge_error(_completions(gw, init["stream_token"], body), 400, code)
    assert gw.backend.calls == []
    ok = _completions(gw, init["stream_token"], {"messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200, ok.text


# --- review 5: what vendors bill beside the text: PDF pages, part keys ------------------


def _pdf_body(pdf: bytes, **extra: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": "Summarise."}, as_file_part(pdf)]
    return {"messages": [{"role": "user", "content": content}], **extra}


def test_a_pdf_of_thousands_of_tiny_pages_is_held_at_the_whole_context_at_init_and_edge(
    gw: Gateway,
) -> None:
    """Vendors bill a PDF per page (~1,500-3,000 tokens each); 2,000 empty pages
    packed in a compressed object stream are a few hundred bytes, once held at a
    token a byte. No vendor bills more input than the context leaves after the
    output, so a request carrying a file is held at that, and the edge sends a file
    only under a token that holds it."""
    pdf = objstm_pdf(2000)
    assert len(pdf) < 1000
    _, token = _owner(gw)
    context = 8192  # mock-vision's (shared/models.yaml), its dearest input rate a cache write
    init = gw.client.init_ok(token, {"model": "mock-vision", "max_tokens": 16, **_pdf_body(pdf)})
    assert micro(init["reserved_credits"]) == _cost(context - 16, 16, "1.25", "2.0")
    gw.backend.calls.clear()
    response = _completions(gw, init["stream_token"], _pdf_body(pdf))
    assert response.status_code == 200, response.text
    assert [p["type"] for p in gw.backend.calls[0][1]["messages"][0]["content"]] == [
        "text",
        "file",
    ]
    # A token held for text alone does not carry the file, however much text it held.
    body = {"messages": [{"role": "user", "content": "word " * 3000}]}
    init = gw.client.init_ok(token, {"model": "mock-vision", "max_tokens": 16, **body})
    gw.backend.calls.clear()
    _edge_error(_completions(gw, init["stream_token"], _pdf_body(pdf)), 413, "input_too_large")
    assert gw.backend.calls == []
    # The refusal did not burn the token.
    assert _completions(gw, init["stream_token"], body).status_code == 200


def test_a_companys_own_files_model_holds_its_whole_context_through_the_sealed_route(
    gw: Gateway,
) -> None:
    """The edge reads a company model's context from the sealed route."""
    company_id, token = _owner(gw)
    body = {"api_key": COMPANY_KEY, "models": {"mock-fast": {"features": ["streaming", "files"]}}}
    assert _put(gw, token, company_id, "mock", body).status_code == 200
    pdf = objstm_pdf(2000)
    init = gw.client.init_ok(token, {"model": "mock-fast", "max_tokens": 16, **_pdf_body(pdf)})
    assert micro(init["reserved_credits"]) == _cost(8192 - 16, 16, "1.0", "2.0")
    gw.backend.calls.clear()
    response = _completions(gw, init["stream_token"], _pdf_body(pdf))
    assert response.status_code == 200, response.text
    assert gw.backend.calls[0][0] == f"Bearer {COMPANY_KEY}"
    body = {"messages": [{"role": "user", "content": "word " * 3000}]}
    init = gw.client.init_ok(token, {"model": "mock-fast", "max_tokens": 16, **body})
    _edge_error(_completions(gw, init["stream_token"], _pdf_body(pdf)), 413, "input_too_large")


def test_an_owner_shrinking_a_files_models_context_on_the_platforms_key_keeps_the_whole_hold(
    gw: Gateway,
) -> None:
    """An owner may lower a packaged model's `context_length` on the platform's key (a
    limit, `PLATFORM_KEY_FIELDS`), and a file was then held at that lowered context:
    the vendor, which never sees the override, bills the PDF's pages up to its own
    context. Measured on mock-vision (context 8192): with the context set to 4096 a
    2,000-page PDF was held 5,132 micro-credits instead of 10,252 (on a 200k-token
    vendor model, ~3k instead of ~200k input tokens), and streamed under that hold."""
    pdf = objstm_pdf(2000)
    company_id, token = _owner(gw)
    body = {"models": {"mock-vision": {"context_length": 4096}}}
    assert _put(gw, token, company_id, "mock", body).status_code == 200
    models = gw.client.as_user(token, "GET", "/v1/models").json()["data"]["models"]
    assert next(m for m in models if m["id"] == "mock-vision")["context_length"] == 4096
    request = {"model": "mock-vision", "max_tokens": 16, **_pdf_body(pdf)}
    whole = _cost(8192 - 16, 16, "1.25", "2.0")  # the backend's context, not the view's
    init = gw.client.init_ok(token, request)
    assert micro(init["reserved_credits"]) == whole
    gw.backend.calls.clear()
    _stream(gw, init)
    assert gw.backend.calls[0][1]["messages"][0]["content"][1]["type"] == "file"
    # The completions path sends the file under such a token too (it was a 413).
    init = gw.client.init_ok(token, request)
    assert micro(init["reserved_credits"]) == whole
    response = _completions(gw, init["stream_token"], _pdf_body(pdf))
    assert response.status_code == 200, response.text


def test_unknown_keys_inside_content_parts_never_ride_upstream(gw: Gateway) -> None:
    """An image is held at a fixed count: 200 KB more inside its part, or beside a
    text part's text, would reach the vendor uncounted (a message's own unknown keys,
    like `name`, were never forwarded)."""
    _, token = _owner(gw)
    padding = "A" * 200_000
    url = "https://example.com/cat.png"
    content = [
        {"type": "text", "text": "Describe it.", "cache": padding},
        {"type": "image_url", "image_url": {"url": url, "detail": "high", "x": padding},
         "y": padding},
    ]  # fmt: skip
    body = {"model": "gpt-4o-mini", "max_tokens": 16,
            "messages": [{"role": "user", "content": content, "name": padding}]}  # fmt: skip
    sent = [
        {"type": "text", "text": "Describe it."},
        {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
    ]
    init = gw.client.init_ok(token, body)
    gw.backend.calls.clear()
    _stream(gw, init)
    assert gw.backend.calls[0][1]["messages"] == [{"role": "user", "content": sent}]
    init = gw.client.init_ok(token, body)
    gw.backend.calls.clear()
    response = _completions(gw, init["stream_token"], {"messages": body["messages"]})
    assert response.status_code == 200, response.text
    assert gw.backend.calls[0][1]["messages"] == [{"role": "user", "content": sent}]


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "x"}},
        {"type": "file", "file": {"filename": "f" * 256, "file_data": PDF_PLAIN}},
        {"type": "file", "file": {"filename": ["a.pdf"], "file_data": PDF_PLAIN}},
    ],
    ids=["detail", "long-filename", "filename-not-a-string"],
)
def test_a_part_key_out_of_bounds_is_refused_at_init_and_edge(
    gw: Gateway, part: dict[str, Any]
) -> None:
    _, token = _owner(gw)
    before = _state(gw, token)
    body = {"messages": [{"role": "user", "content": [part]}]}
    response = gw.client.init(token, {"model": "mock-vision", "max_tokens": 16, **body})
    assert "content[0]" in _cp_error(response, 422, "validation_error")
    assert _state(gw, token) == before
    init = gw.client.init_ok(token, {"model": "mock-vision", "query": "hi", "max_tokens": 16})
    gw.backend.calls.clear()
    _edge_error(_completions(gw, init["stream_token"], body), 400, "invalid_messages")
    assert gw.backend.calls == []


def _tools(count: int, size: int) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": "d" * size,
                "parameters": {"type": "object", "properties": {}},
            },
        }
        for i in range(count)
    ]


def test_tools_are_held_for_at_init(gw: Gateway) -> None:
    _, token = _owner(gw)
    body = {"model": "gpt-4o-mini", "query": "hi", "max_tokens": 16, "tools": _tools(128, 2000)}
    init = gw.client.init_ok(token, body)
    gw.backend.calls.clear()
    _stream(gw, init)
    sent = gw.backend.calls[0][1]
    assert len(sent["tools"]) == 128
    usage = gw.client.wait_usage(token, init["reservation_id"])
    assert usage["input_tokens"] == _true_prompt_tokens(sent) > 60_000
    assert micro(usage["cost"]) == _cost(usage["input_tokens"], 2, "0.15", "0.6")
    assert micro(init["reserved_credits"]) >= micro(usage["cost"])


def test_stop_sequences_count_at_init_and_edge(gw: Gateway) -> None:
    _, token = _owner(gw)
    stops = ["s" * 20_000] * 4
    # On a small model 80 KB of stop sequences do not fit; on a large one they are held for.
    response = gw.client.init(token, {"query": "hi", "max_tokens": 16, "stop": stops})
    _cp_error(response, 413, "input_too_large")
    body = {"model": "gpt-4o-mini", "query": "hi", "max_tokens": 16}
    held = micro(gw.client.init_ok(token, {**body, "stop": stops})["reserved_credits"])
    assert held >= _cost(80_000 // 3, 16, "0.15", "0.6")
    # At the edge: a token minted for "hi" cannot carry 80 KB of `stop` (not held for)
    # or of `user` (past init's own 256-character rule, which the edge applies too).
    small = gw.client.init_ok(token, {"query": "hi", "max_tokens": 16})
    gw.backend.calls.clear()
    for extra, status, code in (
        ({"stop": stops}, 413, "input_too_large"),
        ({"user": "u" * 60_000}, 400, "invalid_user"),
    ):
        body = {"messages": [{"role": "user", "content": "hi"}], **extra}
        _edge_error(_completions(gw, small["stream_token"], body), status, code)
    assert gw.backend.calls == []


# --- 12.5 JSON nested too deep ---------------------------------------------------------


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        node = {"type": "object", "properties": {"x": node}}
    return node


def test_deeply_nested_tools_are_a_clear_400_that_changes_nothing(gw: Gateway) -> None:
    _, token = _owner(gw)
    before = _state(gw, token)
    tools = [{"type": "function", "function": {"name": "f", "parameters": _nested(130)}}]
    response = gw.client.init(token, {"model": "gpt-4o-mini", "query": "hi", "tools": tools})
    _cp_error(response, 400, "json_too_deep")
    assert _state(gw, token) == before
    # At the edge, too, before the token is used.
    init = gw.client.init_ok(token, {"query": "hi", "max_tokens": 16})
    body = {"messages": [{"role": "user", "content": "hi"}], "stop": [str(uuid.uuid4())],
            "user": "u", "deep": _nested(130)}  # fmt: skip
    _edge_error(_completions(gw, init["stream_token"], body), 400, "json_too_deep")
    ok = _completions(gw, init["stream_token"], {"messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200, ok.text


# --- the pure core: one formula for init and edge --------------------------------------


def test_the_estimate_prices_every_part() -> None:
    text = [{"role": "user", "content": "hello world"}]
    assert estimate_input_tokens(text) == math.ceil(len("userhello world") / 3) + 4
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]
    assert estimate_input_tokens(as_parts) == estimate_input_tokens(text)
    with_image = [{"role": "user", "content": [{"type": "text", "text": "hello world"}, IMAGE]}]
    assert estimate_input_tokens(with_image) == estimate_input_tokens(text) + IMAGE_TOKENS
    dear = InputRates(image_tokens=48169)
    assert estimate_input_tokens(with_image, dear) == estimate_input_tokens(text) + 48169
    with_file = [{"role": "user", "content": [{"type": "text", "text": "hello world"}, FILE]}]
    data = FILE["file"]["file_data"]  # type: ignore[index]
    assert estimate_input_tokens(with_file) == (
        estimate_input_tokens(text) + IMAGE_TOKENS + len(data) + len("a.pdf")
    )
    assert carries_files(with_file) and not carries_files([*with_image, *text])
    audio = {"type": "input_audio", "input_audio": {"data": "A" * 300, "format": "wav"}}
    with_audio = [{"role": "user", "content": [{"type": "text", "text": "hello world"}, audio]}]
    assert estimate_input_tokens(with_audio) == estimate_input_tokens(text) + 100
    tools = {"tools": _tools(2, 10)}
    assert params_tokens(tools) == math.ceil(len(orjson.dumps(tools)) / 3)
    assert params_tokens({}) == 0
    # Anthropic: its own tool prompt, and at least 1600 per image.
    anthropic = input_rates("anthropic_messages")
    assert params_tokens(tools, anthropic) == params_tokens(tools) + 350
    assert params_tokens({"stop": ["x"]}, anthropic) == params_tokens({"stop": ["x"]})
    assert estimate_input_tokens(with_image, anthropic) == estimate_input_tokens(text) + 1600
    assert input_rates("anthropic_messages", 48169).image_tokens == 48169
    assert input_rates("openai_chat") == InputRates()
    # Deterministic: key order does not change the count.
    assert params_tokens({"a": 1, "stop": ["x"]}) == params_tokens({"stop": ["x"], "a": 1})


@pytest.mark.parametrize(
    ("content", "code", "features"),
    [
        ([{"type": "text", "text": "x"}], None, set()),
        ([IMAGE], None, {"vision"}),
        ([FILE, IMAGE], None, {"files", "vision"}),
        ([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}], None,
         {"audio"}),
        ([], "invalid_content", None),
        (["text"], "invalid_content", None),
        ([{"type": "text", "text": 5}], "invalid_content", None),
        ([{"type": "image_url", "image_url": "https://x"}], "invalid_content", None),
        ([{"type": "image_url", "image_url": {"url": ""}}], "invalid_content", None),
        ([{"type": "input_audio", "input_audio": {"data": "AA"}}], "invalid_content", None),
        ([{"type": "file", "file": {"file_id": "file-1"}}], "unsupported_content", None),
        ([{"type": "video", "video": {}}], "unsupported_content", None),
    ],
)  # fmt: skip
def test_content_parts_are_checked(content: list[Any], code: str | None, features: Any) -> None:
    if code is None:
        assert check_parts(content, "c") == features
    else:
        with pytest.raises(InputRejected) as info:
            check_parts(content, "c")
        assert info.value.code == code


def test_json_depth_limit() -> None:
    assert not json_too_deep(_nested(MAX_JSON_DEPTH // 2 - 1))
    assert json_too_deep(_nested(MAX_JSON_DEPTH // 2 + 1))
    assert not json_too_deep([[1]], limit=2) and json_too_deep([[[1]]], limit=2)
    assert not json_too_deep("x" * 10, limit=0)


def test_overrides_on_the_platform_key_keep_the_packaged_terms() -> None:
    catalog = load_catalog(None)
    rows = [
        CompanyModel(model_id="gpt-4o-mini", provider="openai",
                     spec={**PRICE_ZERO, "upstream_model": "gpt-4o", "max_output_tokens": 99}),
        CompanyModel(model_id="free-4o", provider="openai", spec=NEW_MODEL),
        CompanyModel(model_id="mock-fast", provider="openai", spec={}),  # moved
    ]  # fmt: skip
    keyed = company_catalog(catalog, rows, None, frozenset({"openai"}))
    assert keyed.models["gpt-4o-mini"].price.input_per_mtok == 0
    assert keyed.models["gpt-4o-mini"].upstream_model == "gpt-4o"
    assert "free-4o" in keyed.models and keyed.models["mock-fast"].provider == "openai"
    platform = company_catalog(catalog, rows, None)
    assert platform.models["gpt-4o-mini"].price == catalog.models["gpt-4o-mini"].price
    assert platform.models["gpt-4o-mini"].upstream_model == "gpt-4o-mini"
    assert platform.models["gpt-4o-mini"].max_output_tokens == 99  # a limit still applies
    assert "free-4o" not in platform.models
    assert platform.models["mock-fast"] == catalog.models["mock-fast"]
    packaged = catalog.models["gpt-4o-mini"]
    assert route_for(catalog, packaged, None) is None
    route = route_for(catalog, packaged, COMPANY_KEY)
    assert route is not None and route.features == packaged.features
    assert route.image_input_tokens == packaged.image_input_tokens == 48169
    assert route.context_length == packaged.context_length
    # A stored override of the image rate on the platform's key is not applied.
    rows = [CompanyModel(model_id="gpt-4o-mini", provider="openai",
                         spec={"image_input_tokens": 1})]  # fmt: skip
    platform = company_catalog(catalog, rows, None)
    assert platform.models["gpt-4o-mini"].image_input_tokens == 48169
    keyed = company_catalog(catalog, rows, None, frozenset({"openai"}))
    own = route_for(catalog, keyed.models["gpt-4o-mini"], COMPANY_KEY)
    assert own is not None and own.image_input_tokens == 1


def test_a_tool_history_sent_to_anthropic_without_tools_is_held_for_the_tools_declared() -> None:
    """Attack: a request without tools whose history holds tool calls goes to
    Anthropic with those tools declared (`tool_choice: none`, its own refusal of tool
    blocks without definitions); Anthropic bills their definitions and its tool-use
    prompt (about 350 tokens), but the measure saw no tools, so the hold, and the
    charge (`min(cost, hold)`), stayed below the bill: the rest unbilled, on every
    such turn. Now it is held as the same request offering those tools."""
    from shared.input_size import input_rates, measure_input
    from shared.text_tokens import text_tokens
    from stream_edge.upstream.anthropic_messages import AnthropicMessagesAdapter
    from stream_edge.upstream.base import UpstreamCall

    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "look it up"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "user", "content": "thanks"},
    ]
    sent = orjson.loads(
        AnthropicMessagesAdapter()
        .build_request(UpstreamCall("http://x", None, "claude", messages, 16, True, {}, "r"))
        .body
    )
    assert sent["tool_choice"] == {"type": "none"}
    rates = input_rates("anthropic_messages")
    # What Anthropic bills, in our formula: the messages (the calls as the text they
    # are), the declared tools and their `tool_choice` as sent, and its tool prompt.
    plain = [
        {"role": m["role"], "content": orjson.dumps(m["tool_calls"]).decode()}
        if m.get("tool_calls")
        else m
        for m in messages
    ]
    declared = text_tokens(
        [orjson.dumps(tool) for tool in sent["tools"]] + [orjson.dumps(sent["tool_choice"])]
    )
    bill = measure_input(plain, {}).at(rates) + declared + rates.tool_prompt_tokens
    assert measure_input(messages, {}).at(rates) >= bill
