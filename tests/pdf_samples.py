"""Small PDFs for the page-count tests: plain page objects, or thousands of them
packed in a compressed object stream (the way a per-page bill hides in a few bytes)."""

from __future__ import annotations

import base64
import zlib

HEAD = b"%PDF-1.7\n1 0 obj <</Type /Catalog /Pages 2 0 R>> endobj\n"
PAGES = b"2 0 obj <</Type /Pages /Count 1 /Kids [3 0 R]>> endobj\n"
PAGE = b"<</Type /Page /Parent 2 0 R>>\n"


def plain_pdf(pages: int, page: bytes = PAGE) -> bytes:
    return HEAD + PAGES + page * pages + b"%%EOF\n"


def _png_up(data: bytes, columns: int) -> bytes:
    """`data` PNG-predicted (filter Up on every row), as a writer with
    /Predictor 12 /Columns `columns` stores it."""
    rows = [data[i : i + columns].ljust(columns, b" ") for i in range(0, len(data), columns)]
    out, prior = bytearray(), bytes(columns)
    for row in rows:
        out += b"\x02" + bytes((a - b) & 0xFF for a, b in zip(row, prior, strict=True))
        prior = row
    return bytes(out)


def objstm_pdf(
    pages: int, *, predictor: bool = False, twice: bool = False, fake_end: bool = False
) -> bytes:
    """`pages` page objects inside one FlateDecode object stream. `predictor`: PNG Up
    predicted (the objects' text never appears inflated); `twice`: deflated twice;
    `fake_end`: a stored deflate block spelling ``endstream`` comes first."""
    objects = PAGE * pages
    parms = b""
    if predictor:
        objects = _png_up(objects, 7)
        parms = b" /DecodeParms <</Predictor 12 /Columns 7>>"
    if fake_end:
        # A stored block (RFC 1951 §3.2.4) keeps its 18 bytes as they are, so the
        # stream shows an `endstream` long before the deflate stream ends.
        stored = b"\x78\x01\x00\x12\x00\xed\xff" + b"\nendstream\nendobj\n"
        deflated = zlib.compressobj(9, zlib.DEFLATED, -15)
        tail = deflated.compress(objects) + deflated.flush()
        adler = zlib.adler32(b"\nendstream\nendobj\n" + objects).to_bytes(4, "big")
        data = stored + tail + adler
    else:
        data = zlib.compress(objects, 9)
    if twice:
        data = zlib.compress(data, 9)
    stream = (
        b"4 0 obj <</Type /ObjStm /N " + str(pages).encode() + b" /First 0 /Filter "
        + (b"[/FlateDecode /FlateDecode]" if twice else b"/FlateDecode") + parms
        + b" /Length " + str(len(data)).encode() + b">>\nstream\n" + data + b"\nendstream\nendobj\n"
    )  # fmt: skip
    return HEAD + PAGES + stream + b"%%EOF\n"


def as_file_part(pdf: bytes, filename: str = "doc.pdf") -> dict[str, object]:
    data = base64.b64encode(pdf).decode()
    return {
        "type": "file",
        "file": {"filename": filename, "file_data": f"data:application/pdf;base64,{data}"},
    }
