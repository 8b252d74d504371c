"""Images, documents and audio in a vendor's request, checked as the vendor would.

The real APIs refuse a media type they do not take or data that is not base64; the
mock does too, so a test through it proves the gateway sent each part in the
vendor's own shape. An accepted part reads as a placeholder (``[image]``) in the
prompt the mock answers and counts.
Anthropic: https://docs.anthropic.com/en/docs/build-with-claude/vision;
Gemini: https://ai.google.dev/api/caching#Part.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from mock_llm.request import invalid, proto_field

ANTHROPIC_IMAGES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
ANTHROPIC_DOCUMENTS = frozenset({"application/pdf"})
GEMINI_TYPES = frozenset(
    {*ANTHROPIC_IMAGES, "application/pdf", "audio/wav", "audio/mp3", "audio/mpeg"}
)


def _base64(data: object, where: str) -> None:
    try:
        if not isinstance(data, str) or not data:
            raise ValueError
        base64.b64decode(data, validate=True)
    except (ValueError, binascii.Error):
        raise invalid(f"{where}: invalid base64 data", where) from None


def anthropic_block_text(block: dict[str, Any], where: str) -> str:
    """An `image` or `document` block's placeholder text (400 when malformed)."""
    kind = block["type"]
    source = block.get("source")
    allowed = ANTHROPIC_IMAGES if kind == "image" else ANTHROPIC_DOCUMENTS
    if not isinstance(source, dict):
        raise invalid(f"{where}.source: Field required", f"{where}.source")
    if source.get("type") == "url" and kind == "image":
        url = source.get("url")
        if not isinstance(url, str) or not url.startswith("https://"):
            raise invalid(f"{where}.source.url: must be an https URL", f"{where}.source.url")
        return f"[{kind}]"
    if source.get("type") != "base64":
        raise invalid(f"{where}.source.type: must be base64 or url", f"{where}.source.type")
    if source.get("media_type") not in allowed:
        raise invalid(
            f"{where}.source.media_type: must be one of {', '.join(sorted(allowed))}",
            f"{where}.source.media_type",
        )
    _base64(source.get("data"), f"{where}.source.data")
    return f"[{kind}]"


def gemini_part_text(part: dict[str, Any], where: str) -> str | None:
    """An `inlineData` / `fileData` part's placeholder text; None for other parts.
    Field names in either proto3 JSON spelling (`proto_field`)."""
    blob = proto_field(part, "inlineData")
    if blob is not None:
        if not isinstance(blob, dict) or proto_field(blob, "mimeType") not in GEMINI_TYPES:
            raise invalid(f"* GenerateContentRequest.{where}.inline_data: bad mime type", where)
        _base64(blob.get("data"), f"* GenerateContentRequest.{where}.inline_data.data")
        return "[media]"
    data = proto_field(part, "fileData")
    if data is not None:
        if (
            not isinstance(data, dict)
            or proto_field(data, "mimeType") not in GEMINI_TYPES
            or not str(proto_field(data, "fileUri") or "").startswith("https://")
        ):
            raise invalid(f"* GenerateContentRequest.{where}.file_data: invalid", where)
        return "[media]"
    return None
