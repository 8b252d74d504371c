"""How many pages a PDF may have, bounded from above (pure, linear, bounded work).

Vendors bill a PDF per page (Anthropic and OpenAI: each page's text plus an image of
it), so the hold needs the page count before anything is sent. A page object is
tiny, and inside a compressed object stream (``/ObjStm``, FlateDecode) thousands
cost a few bytes each, so the count reads every stream it can inflate, and refuses
(`PdfUnbounded`) a file it cannot bound. Over-counting is safe (a larger hold),
under-counting is the leak, so every rule errs upwards:

- **pages**: every name token ``/Page`` (not ``/Pages``, ``/PageLabels``…) anywhere:
  a page object's ``/Type /Page`` whatever whitespace or comments separate key and
  value; ``#``-escaped names (``/P#61ge``) are unescaped first (PDF 32000-1
  §7.3.5). The result is the larger of that and the largest ``/Count N`` (a page
  tree node's), at least 1.
- **streams**: from every ``stream`` keyword, the data is inflated (zlib or gzip
  framing, as lenient parsers accept) until the deflate stream ends, not until an
  ``endstream`` that stored blocks could fake; an output that is itself deflated
  (``[/FlateDecode /FlateDecode]``) is inflated again; a PNG or TIFF predictor named
  in the stream's dictionary is undone, and both forms are scanned.
- **work**: every byte inflated or read by the inflater, and every ``stream``
  keyword, is charged to a budget of `BUDGET_FACTOR` times the file plus
  `BUDGET_FLOOR`, at most `BUDGET_CAP`: a zip bomb costs that much and is refused.
  No regex here can backtrack more than linearly.
- **refused**: an encrypted file (``/Encrypt``: its streams cannot be read), a
  filter we do not decode that could carry objects (LZW, ASCII85, ASCIIHex,
  RunLength, Crypt, and pdf.js's abbreviations of them), predictor parameters given
  by reference, more layers or escaped names or ``/Count`` entries than any real
  file has, or a budget exceeded.
"""

from __future__ import annotations

import re
import zlib

BUDGET_FACTOR = 16
BUDGET_FLOOR = 1 << 20
BUDGET_CAP = 16 << 20
# What each `stream` keyword, and each attempt to inflate, is charged: bounds them.
KEYWORD_COST = 256
INFLATE_COST = 8192
PREDICTOR_CAP = 256 << 10  # bytes un-predicted in all (pure Python per byte)
MAX_LAYERS = 3
MAX_ESCAPED_NAMES = 20_000
MAX_COUNTS = 100_000
CHUNK = 4096

_WS = b"\x00\t\n\x0c\r "
_DELIMS = rb"\x00\t\n\x0c\r ()<>\[\]{}/%"
_REGULAR = rb"[^" + _DELIMS + rb"]"
_GAP = rb"(?:[\x00\t\n\x0c\r ]|%[^\r\n%]*)*"  # whitespace and comments, one way only
_LONGER_PAGE_NAMES = (b"/Pages", b"/PageLabel", b"/PageMode", b"/PageLayout", b"/PageElement")
_ESCAPED = re.compile(rb"/[^" + _DELIMS + rb"#]*#[^" + _DELIMS + rb"]*")
_HEX = re.compile(rb"#([0-9A-Fa-f]{2})")
# A page tree's `/Count` only adds to the bound (its value is the file's word, not
# ours to trust), so a value hidden behind comments or long blanks is simply unread.
_COUNT = re.compile(rb"/Count(?!" + _REGULAR + rb")[\x00\t\n\x0c\r ]{0,64}([0-9]+)")
_FORBIDDEN_NAMES = (
    b"/Encrypt", b"/LZW", b"/ASCII85Decode", b"/A85", b"/ASCIIHexDecode", b"/AHx",
    b"/RunLengthDecode", b"/RL", b"/Crypt",
)  # fmt: skip
_FORBIDDEN = re.compile(
    rb"/(?:Encrypt|LZWDecode|LZW|ASCII85Decode|A85|ASCIIHexDecode|AHx|RunLengthDecode|RL|Crypt)"
    rb"(?!" + _REGULAR + rb")"
)
_STREAM = re.compile(rb"stream[\x00\t\n\x0c\r ]*")
_PARAM_REF = re.compile(
    rb"/(?:DecodeParms|DP|Predictor|Columns|Colors|BitsPerComponent)(?!"
    + _REGULAR
    + rb")"
    + _GAP
    + rb"[0-9]+"
    + _GAP
    + rb"[0-9]+"
    + _GAP
    + rb"R(?!"
    + _REGULAR
    + rb")"
)


class PdfUnbounded(ValueError):
    """The file's page count cannot be bounded (the message says why)."""


class _Budget:
    __slots__ = ("left", "predicted")

    def __init__(self, size: int) -> None:
        self.left = min(BUDGET_FACTOR * size + BUDGET_FLOOR, BUDGET_CAP)
        self.predicted = PREDICTOR_CAP

    def spend(self, amount: int) -> None:
        self.left -= amount
        if self.left < 0:
            raise PdfUnbounded("decompresses to more than we read to count its pages")


def _zlib_start(data: bytes, at: int = 0) -> bool:
    """Whether a zlib (RFC 1950) or gzip header starts at `at`."""
    head = data[at : at + 2]
    if len(head) < 2:
        return False
    if head == b"\x1f\x8b":
        return True
    return head[0] & 0x0F == 8 and head[0] >> 4 <= 7 and (head[0] << 8 | head[1]) % 31 == 0


def _salvage(inflater: zlib._Decompress, chunk: bytes, budget: _Budget) -> bytes:
    """What `chunk` inflates to before the byte that breaks it (lenient parsers keep
    it): halves fed to copies, so O(log n) calls."""
    out = []
    while chunk:
        if len(chunk) == 1:
            try:
                out.append(inflater.decompress(chunk, budget.left + 1))
            except zlib.error:
                pass
            break
        half = len(chunk) // 2
        probe = inflater.copy()
        try:
            out.append(probe.decompress(chunk[:half], budget.left + 1))
        except zlib.error:
            chunk = chunk[:half]
            continue
        inflater, chunk = probe, chunk[half:]
    data = b"".join(out)
    budget.spend(len(data))
    return data


def _inflate(data: bytes, start: int, budget: _Budget) -> bytes:
    """The deflate stream at `start`, to its end (or to the first error)."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)
    out: list[bytes] = []
    pos = start
    while pos < len(data) and not inflater.eof:
        chunk = data[pos : pos + CHUNK]
        before = inflater.copy()
        try:
            piece = inflater.decompress(chunk, budget.left + 1)
        except zlib.error:
            out.append(_salvage(before, chunk, budget))
            break
        if inflater.unconsumed_tail:
            raise PdfUnbounded("decompresses to more than we read to count its pages")
        used = len(chunk) - len(inflater.unused_data)
        budget.spend(len(piece) + used)
        out.append(piece)
        pos += used
    return b"".join(out)


def _param(region: bytes, name: bytes, default: int) -> int:
    found = re.findall(rb"/" + name + rb"(?!" + _REGULAR + rb")" + _GAP + rb"([0-9]+)", region)
    if len(found) > 1 or (found and len(found[0]) > 9):
        raise PdfUnbounded(f"a stream gives /{name.decode()} more than once, or out of range")
    return int(found[0]) if found else default


def _unpredict(data: bytes, region: bytes, budget: _Budget) -> bytes | None:
    """`data` with the predictor of its stream's dictionary (`region`) undone (PDF
    32000-1 §7.4.4.4: TIFF 2, PNG 10-15), or None when it names none."""
    predictor = _param(region, b"Predictor", 1)
    if predictor < 2:
        return None
    colors = _param(region, b"Colors", 1)
    bits = _param(region, b"BitsPerComponent", 8)
    columns = _param(region, b"Columns", 1)
    if not (1 <= colors <= 64 and bits in (1, 2, 4, 8, 16) and 1 <= columns <= 1 << 20):
        raise PdfUnbounded("a stream's predictor parameters are out of range")
    budget.predicted -= len(data)
    if budget.predicted < 0:
        raise PdfUnbounded("has more predictor-encoded data than we decode")
    bpp = max(1, colors * bits // 8)
    row = (colors * bits * columns + 7) // 8
    out = bytearray()
    if predictor == 2:  # TIFF: each byte after the first pixel adds the one a pixel back
        for start in range(0, len(data), row):
            line = bytearray(data[start : start + row])
            for i in range(bpp, len(line)):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
            out += line
        return bytes(out)
    prior = bytearray(row)
    for start in range(0, len(data), row + 1):
        kind, line = data[start], bytearray(data[start + 1 : start + 1 + row])
        for i in range(len(line)):
            left = line[i - bpp] if i >= bpp else 0
            up = prior[i]
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                corner = prior[i - bpp] if i >= bpp else 0
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                guess = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + guess) & 0xFF
        out += line
        prior = line + bytearray(row - len(line))
    return bytes(out)


class _Counter:
    __slots__ = ("count", "escaped", "pages")

    def __init__(self) -> None:
        self.pages = 0
        self.count = 0
        self.escaped = 0

    def _unescape(self, match: re.Match[bytes]) -> bytes:
        self.escaped += 1
        if self.escaped > MAX_ESCAPED_NAMES:
            raise PdfUnbounded("has more escaped names than we read")
        return _HEX.sub(lambda m: bytes((int(m.group(1), 16),)), match.group(0))

    def normalise(self, text: bytes) -> bytes:
        """Names with ``#xx`` escapes spelled out. A matched name runs to a delimiter,
        so spelling it out can join or split tokens only within itself: a count can
        only grow."""
        return _ESCAPED.sub(self._unescape, text) if b"#" in text else text

    def scan(self, text: bytes) -> None:
        text = self.normalise(text)
        # Substring tests first (C speed): the regexes run only where they can match.
        if any(name in text for name in _FORBIDDEN_NAMES):
            forbidden = _FORBIDDEN.search(text)
            if forbidden is not None:
                name = forbidden.group(0).decode("ascii")
                raise PdfUnbounded(f"uses {name}, which could hide pages from the count")
        # Every `/Page` less those followed by a character that continues the name:
        # the common longer names are subtracted, any other counts (safe: more).
        self.pages += text.count(b"/Page") - sum(text.count(n) for n in _LONGER_PAGE_NAMES)
        counts = text.count(b"/Count")
        if counts > MAX_COUNTS:
            raise PdfUnbounded("has more /Count entries than we read")
        if counts:
            for match in _COUNT.finditer(text):
                digits = match.group(1)
                value = 1 << 31 if len(digits) > 10 else int(digits)
                self.count = max(self.count, value)


def _decode_stream(
    pdf: bytes, start: int, region: bytes, counter: _Counter, budget: _Budget
) -> None:
    """Inflate the stream at `start` (layer after layer), scanning each form."""
    data, source, at = b"", pdf, start
    for layer in range(MAX_LAYERS):
        if layer:
            budget.spend(INFLATE_COST)
        data = _inflate(source, at, budget)
        counter.scan(data)
        forms = [data]
        plain = _unpredict(data, region, budget)
        if plain is not None:
            counter.scan(plain)
            forms.append(plain)
        deeper = next((form for form in forms if _zlib_start(form)), None)
        if deeper is None:
            return
        source, at = deeper, 0
    raise PdfUnbounded(f"nests more than {MAX_LAYERS} compression layers")


def page_bound(pdf: bytes) -> int:
    """At least as many pages as any reader finds in `pdf` (see the module doc);
    PdfUnbounded when that cannot be known."""
    budget = _Budget(len(pdf))
    counter = _Counter()
    counter.scan(pdf)
    boundary = 0
    for keyword in _STREAM.finditer(pdf):
        budget.spend(KEYWORD_COST)
        start = keyword.end()
        if _zlib_start(pdf, start):
            budget.spend(INFLATE_COST)
            # The stream's dictionary lies between the previous keyword and this one.
            region = counter.normalise(pdf[boundary : keyword.start()])
            if _PARAM_REF.search(region):
                raise PdfUnbounded("gives a stream's decode parameters by reference")
            _decode_stream(pdf, start, region, counter, budget)
        boundary = start
    return max(1, counter.pages, counter.count)
