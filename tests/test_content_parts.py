"""Images, files and audio per vendor (issue 15.2): strict `data:` URLs and the
translation of OpenAI content parts into Anthropic blocks and Gemini parts. Pure
tables, no I/O; the refusals through real servers are in tests/test_money_inputs.py."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from shared.catalog import CatalogError, parse_catalog
from shared.input_size import InputRejected, check_parts
from stream_edge.upstream.anthropic_messages import AnthropicMessagesAdapter
from stream_edge.upstream.base import UpstreamCall
from stream_edge.upstream.gemini import GeminiAdapter
from stream_edge.upstream.openai_chat import OpenAIChatAdapter
from stream_edge.upstream.parts import PartError, anthropic_blocks

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(40))).decode()
PDF = base64.b64encode(b"%PDF-1.4 hello").decode()
WAV = base64.b64encode(b"RIFF....WAVEfmt ").decode()


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


PARTS: list[dict[str, Any]] = [
    {"type": "text", "text": "What is in these?"},
    image(f"data:image/png;base64,{PNG}"),
    image("https://example.com/cat.webp?size=2"),
    {"type": "file", "file": {"filename": "a.pdf",
                              "file_data": f"data:application/pdf;base64,{PDF}"}},
    {"type": "file", "file": {"filename": "b.pdf", "file_data": PDF}},
]  # fmt: skip
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": PARTS},
]


def call(messages: list[dict[str, Any]]) -> UpstreamCall:
    return UpstreamCall(
        base_url="https://backend.example", api_key="k", upstream_model="m",
        messages=messages, max_tokens=10, stream=True, params={}, request_id="r",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("part", "code"),
    [
        (image(f"data:image/png;base64,{PNG}"), None),
        (image(f"data:image/jpeg;base64,{PNG}"), None),
        (image("https://example.com/a.png"), None),
        # Garbage and tricks: never forwarded for a vendor to choke on.
        (image("data:image/png;base64,not base64!"), "invalid_content"),
        (image("data:image/png;base64,QUJD"[:-1]), "invalid_content"),  # length 3
        (image("data:image/png;base64,QU=J"), "invalid_content"),  # padding inside
        (image("data:image/png;base64,"), "invalid_content"),
        (image(f"data:image/png,{PNG}"), "invalid_content"),  # not base64-encoded
        (image(f"data:image/png;charset=x;base64,{PNG}"), "invalid_content"),
        (image(f"data:image/png;base64,{PNG}\n"), "invalid_content"),
        (image(f"data:image/png;base64,{PNG.replace('+', '-')}-_"), "invalid_content"),
        (image(f"data:;base64,{PNG}"), "invalid_content"),
        (image(f"data:image/svg+xml;base64,{PNG}"), "unsupported_content"),
        (image(f"data:text/html;base64,{PNG}"), "unsupported_content"),
        (image(f"data:application/pdf;base64,{PDF}"), "unsupported_content"),
        (image("http://example.com/a.png"), "invalid_content"),
        (image("file:///etc/passwd"), "invalid_content"),
        (image("javascript:alert(1)"), "invalid_content"),
        (image("https://"), "invalid_content"),
        (image("https://[::1/a.png"), "invalid_content"),  # urlsplit raises: never a 500
        (image("https://example.com/a\x00.png"), "invalid_content"),
        (image("https://example.com/" + "a" * 3000), "invalid_content"),
        ({"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PDF}"}}, None),
        ({"type": "file", "file": {"file_data": PDF}}, None),
        ({"type": "file", "file": {"file_data": "%PDF-1.4 raw"}}, "invalid_content"),
        ({"type": "file", "file": {"file_data": f"data:image/png;base64,{PNG}"}},
         "unsupported_content"),
        ({"type": "file", "file": {"file_data": f"data:application/x-sh;base64,{PDF}"}},
         "unsupported_content"),
        ({"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}}, None),
        ({"type": "input_audio", "input_audio": {"data": WAV, "format": "mp3"}}, None),
        ({"type": "input_audio", "input_audio": {"data": WAV, "format": "flac"}},
         "unsupported_content"),
        ({"type": "input_audio", "input_audio": {"data": "**", "format": "wav"}},
         "invalid_content"),
    ],
)  # fmt: skip
def test_media_is_checked_strictly(part: dict[str, Any], code: str | None) -> None:
    if code is None:
        check_parts([part], "c")
        return
    with pytest.raises(InputRejected) as info:
        check_parts([part], "c")
    assert info.value.code == code
    assert info.value.where.startswith("c[0].")


def b64(media_type: str, data: str) -> dict[str, str]:
    return {"type": "base64", "media_type": media_type, "data": data}


def test_anthropic_gets_image_and_document_blocks() -> None:
    body = orjson.loads(AnthropicMessagesAdapter().build_request(call(MESSAGES)).body)
    assert body["system"] == "Be brief."
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                {"type": "image", "source": b64("image/png", PNG)},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.webp?size=2"}},
                {"type": "document", "source": b64("application/pdf", PDF)},
                {"type": "document", "source": b64("application/pdf", PDF)},
            ],
        }
    ]  # fmt: skip


def test_gemini_gets_inline_and_file_data() -> None:
    audio = {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}}
    messages = [*MESSAGES[:1], {"role": "user", "content": [*PARTS, audio]}]
    body = orjson.loads(GeminiAdapter().build_request(call(messages)).body)
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [
                {"text": "What is in these?"},
                {"inlineData": {"mimeType": "image/png", "data": PNG}},
                {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/cat.webp?size=2"}},
                {"inlineData": {"mimeType": "application/pdf", "data": PDF}},
                {"inlineData": {"mimeType": "application/pdf", "data": PDF}},
                {"inlineData": {"mimeType": "audio/wav", "data": WAV}},
            ],
        }
    ]  # fmt: skip


def test_openai_gets_the_parts_as_sent() -> None:
    body = orjson.loads(OpenAIChatAdapter().build_request(call(MESSAGES)).body)
    assert body["messages"][1]["content"] == PARTS


def test_text_only_parts_stay_text() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    anthropic = orjson.loads(AnthropicMessagesAdapter().build_request(call(messages)).body)
    assert anthropic["messages"] == [{"role": "user", "content": "ab"}]
    gemini = orjson.loads(GeminiAdapter().build_request(call(messages)).body)
    assert gemini["contents"] == [{"role": "user", "parts": [{"text": "ab"}]}]


def test_a_part_that_slipped_through_never_goes_as_something_else() -> None:
    with pytest.raises(PartError):
        anthropic_blocks([image("data:image/png;base64,@@@")])
    with pytest.raises(PartError):
        anthropic_blocks([{"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}}])


def test_catalog_refuses_audio_on_anthropic() -> None:
    doc = {
        "default_model": "c",
        "providers": {"a": {"api_type": "anthropic_messages", "base_url": "https://x"}},
        "models": {"c": {"provider": "a", "context_length": 10, "max_output_tokens": 5,
                         "features": ["streaming", "audio"],
                         "price": {"input_per_mtok": 1, "output_per_mtok": 1}}},
    }  # fmt: skip
    with pytest.raises(CatalogError, match="audio"):
        parse_catalog(doc)
