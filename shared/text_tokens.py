"""How many tokens a text can cost a vendor, at most (pure; `shared.input_size`).

One token per 3 UTF-8 bytes covers natural language (real tokenizers average about
4 bytes a token on English) but not text that defeats the merges: a BPE tokenizer
first cuts the text into *pieces* and never merges across them (OpenAI's cl100k and
o200k split patterns, as tiktoken ships them; Llama 3 uses cl100k's), and each piece
is at least one token. So ``"1,2,3,…"`` or ``"a1a1…"`` costs a token per byte, three
times the byte rate. A text's estimate is therefore the larger of

* one token per 3 bytes, and
* one token per piece, plus one per full 24 bytes (a rare word is a piece of several
  tokens; this keeps the bound when a text mixes prose with short pieces).

`pieces` counts the pieces those patterns cut, never fewer on ASCII text: a run of
letters (with the one space or punctuation mark before it), a capital after a small
letter (o200k), up to 3 digits, a run of punctuation (with one space before it), a
line break or a tab, and a space of its own before a digit, a line break or the end
or before the last space of a run. Other characters are read by their first UTF-8
byte: Latin-1 signs, combining marks, U+2000-2FFF (dashes, curly quotes, symbols)
and emoji are signs, a piece of their own with the rest of their bytes another;
everything else is a letter, as CJK, Cyrillic or Arabic text is, and is held at
least at the byte rate. Not a strict bound there: digits of other scripts between
spaces (`` ٣a ٣a``) or Greek and Cyrillic capitals after small letters can still
cost a vendor up to about twice the estimate (a strict bound would be a token per
byte, tripling every hold). tests/test_text_tokens.py pins the rules.

It runs on every message at init and at the edge, so it is linear and runs at C
speed (`bytes.translate`, `bytes.count` and one big-integer shift, about 11 µs a
KiB), never a Python step per character or per piece: a regular expression
returning each piece took 0.4 s on 1 MiB of ``"1,"``.
"""

from __future__ import annotations

from collections.abc import Sequence

BYTES_PER_TOKEN = 3
BYTES_PER_EXTRA_TOKEN = 24

# Each byte's class, in 3 bits. NONE is "no byte": before the first, after the last.
NONE, LOWER, UPPER, DIGIT, PUNCT, SIGN, SPACE, BREAK = range(8)
_LETTERS = (LOWER, UPPER)


def _class(byte: int) -> int:
    if byte >= 0x80:
        # UTF-8, by its first byte: U+0080-00BF (Latin-1 signs), U+0300-036F
        # (combining marks), U+2000-2FFF (dashes, quotes, symbols) and U+10000 up
        # (emoji) are signs; the rest, and the bytes that continue a character,
        # letters. So a sign is a piece and the rest of its bytes another: at least
        # the pieces a vendor cuts around it, whatever it is.
        return SIGN if byte in (0xC2, 0xCC, 0xCD, 0xE2) or byte >= 0xF0 else LOWER
    char = chr(byte)
    if char.islower():
        return LOWER
    if char.isupper():
        return UPPER
    if char.isdigit():
        return DIGIT
    if char == "'":  # cl100k cuts 's 't 're… off a word: it never leads a letter run
        return SIGN
    if char == " ":
        return SPACE
    return BREAK if char.isspace() else PUNCT


# What a byte's class, after the class of the byte before it, adds. Most starts are
# one piece (STARTS). Three rules need a third byte, so they get symbols of their own
# and are counted as pairs of symbols: a lone punctuation mark (LONE_PUNCT) followed
# by a letter (AFTER_PUNCT) is one piece, ".bar" (not after a space: " ." is a
# piece); a run of spaces (SPACES, MORE_SPACES) leaves all but its last space as a
# piece of their own.
NOTHING, STARTS, TWO, LONE_PUNCT, AFTER_PUNCT, SPACES, MORE_SPACES = range(7)


def _symbol(before: int, here: int) -> int:
    if here == NONE:  # the end: trailing spaces are a piece
        return STARTS if before == SPACE else NOTHING
    if here in _LETTERS:
        if before == LOWER and here == UPPER:
            return STARTS
        if before in _LETTERS:
            return NOTHING
        return AFTER_PUNCT if before == PUNCT else STARTS
    if here == DIGIT:  # a space before digits is a piece of its own
        return NOTHING if before == DIGIT else TWO if before == SPACE else STARTS
    if here in (PUNCT, SIGN):
        if before in (PUNCT, SIGN):
            return NOTHING
        if here == SIGN:  # it may be a digit (², ٣): a space before it is a piece
            return TWO if before == SPACE else STARTS
        return STARTS if before == SPACE else LONE_PUNCT
    if here == BREAK:  # and so is a space before a line break or a tab
        return TWO if before == SPACE else STARTS
    return MORE_SPACES if before == SPACE else SPACES


_CLASSES = bytes(_class(byte) for byte in range(256))
# Indexed by (class before) << 3 | (class here).
_SYMBOLS = bytes(_symbol(pair >> 3, pair & 7) if pair < 64 else NOTHING for pair in range(256))
_NOT_ONE = bytes(s for s in range(256) if s not in (STARTS, LONE_PUNCT, AFTER_PUNCT))
_ATTACHED = bytes((LONE_PUNCT, AFTER_PUNCT))
_SPACE_RUN = bytes((SPACES, MORE_SPACES))
_THREE_DIGITS = bytes((DIGIT, DIGIT, DIGIT))


def pieces(raw: bytes) -> int:
    """How many pieces a BPE pre-tokenizer cuts UTF-8 `raw` into, at least."""
    classes = raw.translate(_CLASSES)
    # Each byte's class beside the class of the byte before it, as one byte: the
    # shift by a byte and 3 bits puts the previous class in bits 3-5.
    packed = int.from_bytes(classes, "little")
    pairs = (packed | packed << 11).to_bytes(len(classes) + 1, "little").translate(_SYMBOLS)
    return (
        len(pairs.translate(None, _NOT_ONE))
        + 2 * pairs.count(TWO)
        - pairs.count(_ATTACHED)
        + pairs.count(_SPACE_RUN)
        # Digits go in groups of 3: a run of k is ceil(k / 3) pieces, counted as
        # 1 + floor(k / 3) (one more when k is a multiple of 3).
        + classes.count(_THREE_DIGITS)
    )


def text_tokens(texts: Sequence[bytes]) -> int:
    """The most tokens these texts (UTF-8) can cost, counted as one: see the module
    doc. Each text's pieces are its own (a line break between them is not counted)."""
    size = sum(map(len, texts))
    return text_bound(size, pieces(b"\n".join(texts)) - max(len(texts) - 1, 0))


def text_bound(size: int, count: int) -> int:
    """The most tokens a text of `size` UTF-8 bytes cut into `count` pieces can cost:
    the larger of the byte rate and the piece rate (see the module doc)."""
    return max(byte_tokens(size), piece_tokens(size, count))


def byte_tokens(size: int) -> int:
    """The bound's byte rate alone: a token per `BYTES_PER_TOKEN` bytes, rounded up."""
    return -(-size // BYTES_PER_TOKEN)


def piece_tokens(size: int, count: int) -> int:
    """The bound's piece rate alone: a token per piece, plus one per full
    `BYTES_PER_EXTRA_TOKEN` bytes (a rare word is a piece of several tokens)."""
    return count + size // BYTES_PER_EXTRA_TOKEN
