"""Inline media in content parts: strict `data:` URLs, media-type whitelists (pure).

A content part's bytes are forwarded to a vendor that decodes them: Anthropic wants
`{"type": "base64", "media_type", "data"}`, Gemini `{"inlineData": {"mimeType",
"data"}}`. Whatever reaches them must be a media type they take and valid base64, so
both services refuse anything else before a hold is taken (400/422, `shared.input_size`
`check_parts`) instead of letting a vendor fail mid-request.

`data:` URLs (RFC 2397) are read strictly: ``data:<type>;base64,<data>`` only, the
type from the whitelist of the part's kind, the data canonical base64 (RFC 4648 §4:
alphabet, padding, length a multiple of 4; no whitespace, no URL-safe alphabet).
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

# What every vendor we translate for takes (Anthropic's image list is the narrowest).
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
# Files go to Anthropic as `document` blocks, which take PDFs as base64.
FILE_TYPES = frozenset({"application/pdf"})
# OpenAI's `input_audio.format` → its media type.
AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mp3"}
# A file part without a data URL (OpenAI also allows bare base64) is a PDF.
DEFAULT_FILE_TYPE = "application/pdf"
# An `https:` image URL names no media type; Gemini's `fileData` needs one.
_EXTENSION_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
}
DEFAULT_IMAGE_TYPE = "image/jpeg"
MAX_URL_CHARS = 2048

_DATA_URL = re.compile(r"data:([a-z0-9.+-]+/[a-z0-9.+-]+);base64,(.*)", re.DOTALL)


class MediaError(ValueError):
    """`unsupported` when the media type is well-formed but not one we send."""

    def __init__(self, message: str, *, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


@dataclass(frozen=True, slots=True)
class Inline:
    """Bytes sent inline: their media type and canonical base64 text."""

    media_type: str
    data: str


def is_base64(data: str) -> bool:
    """Whether `data` is canonical base64: one strict decode at C speed (~3 ms a MiB).
    A regular expression backtracked through every group of a 1 MiB part whose last
    character was wrong (45 ms of the event loop, for a request refused at will). The
    decode alone also takes padding past a whole group ("AAAA===="), which no
    canonical text has: "=" only in the last two places, in groups of 4."""
    if not data or len(data) % 4 or not data.isascii() or data.find("=", 0, len(data) - 2) != -1:
        return False
    try:
        binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error:
        return False
    return True


def parse_data_url(url: str, allowed: frozenset[str]) -> Inline:
    """``data:<type>;base64,<data>`` with `<type>` in `allowed`; MediaError otherwise."""
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise MediaError("must be a data URL of the form data:<media type>;base64,<data>")
    media_type, data = match.groups()
    if media_type not in allowed:
        raise MediaError(
            f"media type {media_type} is not one of {', '.join(sorted(allowed))}",
            unsupported=True,
        )
    if not is_base64(data):
        raise MediaError("is not valid base64")
    return Inline(media_type, data)


def image_source(url: str) -> Inline | str:
    """An `image_url.url`: its inline bytes (a `data:` URL) or the `https:` URL itself."""
    if url.startswith("data:"):
        return parse_data_url(url, IMAGE_TYPES)
    if len(url) > MAX_URL_CHARS:
        raise MediaError(f"must be at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # e.g. "https://[::1" (an unclosed IPv6 literal)
        host = None
    if not host or parts.scheme != "https" or any(c.isspace() or ord(c) < 32 for c in url):
        raise MediaError("must be an https: URL or a data: URL")
    return url


def file_source(file_data: str) -> Inline:
    """A `file.file_data`: a `data:` URL, or bare base64 (taken as a PDF)."""
    if file_data.startswith("data:"):
        return parse_data_url(file_data, FILE_TYPES)
    if not is_base64(file_data):
        raise MediaError("must be a data: URL or base64")
    return Inline(DEFAULT_FILE_TYPE, file_data)


def audio_source(data: str, audio_format: str) -> Inline:
    media_type = AUDIO_FORMATS.get(audio_format)
    if media_type is None:
        raise MediaError(
            f"format must be one of {', '.join(sorted(AUDIO_FORMATS))}", unsupported=True
        )
    if not is_base64(data):
        raise MediaError("is not valid base64")
    return Inline(media_type, data)


def url_media_type(url: str) -> str:
    """An image URL's media type, guessed from its path's extension."""
    try:
        path = urlsplit(url).path.lower()
    except ValueError:
        path = ""
    return next(
        (kind for ext, kind in _EXTENSION_TYPES.items() if path.endswith(ext)),
        DEFAULT_IMAGE_TYPE,
    )
