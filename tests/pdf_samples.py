"""A small PDF that a vendor bills per page: thousands of empty page objects packed
in one compressed object stream, a few bytes each."""

from __future__ import annotations

import base64
import zlib

HEAD = b"%PDF-1.7\n1 0 obj <</Type /Catalog /Pages 2 0 R>> endobj\n"
PAGES = b"2 0 obj <</Type /Pages /Count 1 /Kids [3 0 R]>> endobj\n"
PAGE = b"<</Type /Page /Parent 2 0 R>>\n"


def objstm_pdf(pages: int) -> bytes:
    """`pages` page objects inside one FlateDecode object stream."""
    data = zlib.compress(PAGE * pages, 9)
    stream = (
        b"4 0 obj <</Type /ObjStm /N " + str(pages).encode() + b" /First 0 /Filter /FlateDecode"
        + b" /Length " + str(len(data)).encode() + b">>\nstream\n" + data + b"\nendstream\nendobj\n"
    )  # fmt: skip
    return HEAD + PAGES + stream + b"%%EOF\n"


def as_file_part(pdf: bytes, filename: str = "doc.pdf") -> dict[str, object]:
    data = base64.b64encode(pdf).decode()
    return {
        "type": "file",
        "file": {"filename": filename, "file_data": f"data:application/pdf;base64,{data}"},
    }
