"""The PDF page bound (`shared.pdf_pages`): pure tables. Pages counted wherever a
reader finds them (whitespace, comments, escaped names, compressed object streams,
predictors, chained filters, a fake ``endstream``), files that cannot be bounded
refused, and a 10 MB input handled. The attacks through real servers are in
tests/test_money_inputs.py."""

from __future__ import annotations

import os
import zlib

import pytest

from shared.pdf_pages import BUDGET_CAP, PdfUnbounded, page_bound
from tests.pdf_samples import HEAD, PAGES, objstm_pdf, plain_pdf


@pytest.mark.parametrize(
    ("page", "pages_per_object"),
    [
        (b"<</Type /Page>>", 1),
        (b"<</Type/Page>>", 1),
        (b"<</Type  \r\n /Page/Parent 2 0 R>>", 1),
        (b"<</Type%comment\n/Page>>", 1),
        (b"<</Type /P#61ge>>", 1),  # `#61` is `a` (PDF 32000-1 §7.3.5)
        (b"<</Typ#65 /#50#61#67#65>>", 1),
        (b"<</Type /Pages /Kids []>>", 0),
        (b"<</Type /PageLabels>>", 0),
    ],
)
def test_page_objects_are_counted_however_they_are_spelled(
    page: bytes, pages_per_object: int
) -> None:
    document = HEAD + b"2 0 obj <</Type /Pages /Count 0>> endobj\n" + page * 40
    assert page_bound(document) == max(1, 40 * pages_per_object)


def test_the_larger_of_the_page_objects_and_the_page_trees_count() -> None:
    assert page_bound(plain_pdf(3)) == 3
    assert page_bound(HEAD + b"<</Type /Pages /Count  250 /Kids []>>") == 250
    assert page_bound(b"%PDF-1.4 hello") == 1  # never below one page


@pytest.mark.parametrize(
    "options",
    [{}, {"predictor": True}, {"twice": True}, {"fake_end": True}],
    ids=["flate", "png-predictor", "flate-twice", "fake-endstream"],
)
def test_pages_inside_compressed_object_streams_are_counted(options: dict[str, bool]) -> None:
    document = objstm_pdf(5000, **options)
    assert len(document) < 2000  # a few bytes a page: the bill hides here
    assert page_bound(document) >= 5000


def test_gzip_framed_streams_are_read_too() -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    data = packer.compress(b"<</Type/Page>>" * 300) + packer.flush()
    assert page_bound(HEAD + b"4 0 obj <<>>\nstream\n" + data + b"\nendstream") == 300


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (plain_pdf(1) + b"trailer <</Encrypt 9 0 R>>", "/Encrypt"),
        (HEAD + b"4 0 obj <</Filter /LZWDecode>>\nstream\n...", "/LZWDecode"),
        (HEAD + b"4 0 obj <</Filter [/A85 /Fl]>>\nstream\n...", "/A85"),
        (HEAD + b"4 0 obj <</Filter /ASCIIH#65xDecode>>\nstream\n...", "/ASCIIHexDecode"),
        (HEAD + b"4 0 obj <</Filter /RunLengthDecode>>", "/RunLengthDecode"),
        (HEAD + b"4 0 obj <</Filter /Crypt>>", "/Crypt"),
        (HEAD + b"4 0 obj <</DecodeParms 7 0 R>>\nstream\n" + zlib.compress(b"x"), "reference"),
        (HEAD + b"4 0 obj <<>>\nstream\n" + zlib.compress(b"\0" * (64 << 20)), "decompresses"),
        # Four layers of deflate, each hiding the next.
        (
            HEAD + b"4 0 obj <<>>\nstream\n" + zlib.compress(zlib.compress(zlib.compress(
                zlib.compress(b"<</Type/Page>>" * 100))))
        , "layers"),
    ],
)  # fmt: skip
def test_files_that_cannot_be_bounded_are_refused(document: bytes, reason: str) -> None:
    with pytest.raises(PdfUnbounded) as info:
        page_bound(document)
    assert reason in str(info.value)


def test_a_zip_bomb_costs_the_budget_at_most() -> None:
    """Output is read in bounded pieces: a bomb that inflates far past the budget is
    refused without ever being held in memory whole."""
    bomb = zlib.compress(b"\0" * (BUDGET_CAP * 4), 9)
    with pytest.raises(PdfUnbounded):
        page_bound(PAGES + b"stream\n" + bomb)


def test_ten_megabytes_of_anything_are_handled() -> None:
    """Linear work on inputs that would make a naive scanner backtrack or loop (no
    timing asserted: the test finishing is the point)."""
    noise = os.urandom(10 << 20)
    assert page_bound(noise) >= 1
    assert page_bound(b"/Type /Page " * (900_000)) == 900_000
    assert page_bound(b"/Count" + b" " * (10 << 20) + b"5") == 1
    for hostile in (b"stream\n\x78\x9c" * 1_200_000, b"/a#41" * 2_100_000):
        with pytest.raises(PdfUnbounded):
            page_bound(hostile)
