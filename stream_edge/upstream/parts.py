"""OpenAI content parts in Anthropic's and Gemini's words (pure; docs/content-parts.md).

Parts were checked before anything was held (`shared.input_size.check_parts`, the
same `shared.media` rules), so here a `data:` URL always parses; the check is run
again only because a part that somehow slipped through must fail loudly, never reach
a vendor as something else.

- Anthropic (https://docs.anthropic.com/en/docs/build-with-claude/vision, …/pdf-support):
  `image_url` → `{"type": "image", "source": {"type": "base64", "media_type", "data"}}`
  or `{"type": "url", "url"}`; `file` → `{"type": "document", "source": {"type":
  "base64", "media_type": "application/pdf", "data"}}`. Anthropic takes no audio: the
  catalog refuses an Anthropic model that lists `audio`.
- Gemini (https://ai.google.dev/api/caching#Part): inline bytes → `{"inlineData":
  {"mimeType", "data"}}`, an `https:` image → `{"fileData": {"mimeType", "fileUri"}}`
  (the type guessed from the URL's extension, JPEG when it has none).
"""

from __future__ import annotations

from typing import Any, TypeGuard

from shared import media


class PartError(ValueError):
    """A content part this vendor cannot take (never a client's fault: checked at init)."""


def has_media(content: Any) -> TypeGuard[list[Any]]:
    """Whether `content` is a part list with anything beside text."""
    return isinstance(content, list) and any(
        isinstance(p, dict) and p.get("type", "text") != "text" for p in content
    )


def _inline(part: dict[str, Any]) -> media.Inline | str:
    """A non-text part's bytes (or an image's https URL)."""
    kind = part.get("type")
    try:
        if kind == "image_url":
            return media.image_source(part["image_url"]["url"])
        if kind == "file":
            return media.file_source(part["file"]["file_data"])
        if kind == "input_audio":
            audio = part["input_audio"]
            return media.audio_source(audio["data"], audio["format"])
    except (media.MediaError, KeyError, TypeError) as exc:
        raise PartError(f"malformed {kind} part") from exc
    raise PartError(f"unknown content part {kind!r}")


def anthropic_blocks(content: list[Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type", "text") == "text":
            if part.get("text"):  # Anthropic refuses empty text blocks
                blocks.append({"type": "text", "text": part["text"]})
            continue
        if part.get("type") == "input_audio":
            raise PartError("Anthropic takes no audio")
        source = _inline(part)
        if isinstance(source, str):
            blocks.append({"type": "image", "source": {"type": "url", "url": source}})
            continue
        block_type = "document" if part["type"] == "file" else "image"
        inline = {"type": "base64", "media_type": source.media_type, "data": source.data}
        blocks.append({"type": block_type, "source": inline})
    return blocks


def gemini_parts(content: list[Any]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type", "text") == "text":
            if part.get("text"):
                parts.append({"text": part["text"]})
            continue
        source = _inline(part)
        if isinstance(source, str):
            file_data = {"mimeType": media.url_media_type(source), "fileUri": source}
            parts.append({"fileData": file_data})
        else:
            parts.append({"inlineData": {"mimeType": source.media_type, "data": source.data}})
    return parts
