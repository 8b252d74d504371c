"""How many output tokens a streamed delta can be, at most (pure; `stream_edge.meter`).

Used only when a stream ends before the backend's own usage arrives (the client
left, a limit cut it): the figure is billed, so it must not fall below what the
vendor bills, or a member could prompt for text that costs a vendor a token per byte
(``"1,2,3,4,5,6,7,8,"``, ``"a1a1…"``) and leave just before the end. The bound is the
input estimate's (`shared.text_tokens`): a BPE tokenizer never merges across the
pieces its split pattern cuts, so every piece is at least one token.

* OpenAI streams one token per delta, and a token lies within one piece: a delta
  is one token when it is one piece, and at least one in any case. A backend that
  batches (OpenRouter, vLLM's stream interval) sends several in one delta, which
  are counted by their pieces; past `ONE_TOKEN_CHARS` the delta is surely a batch
  and gets the input estimate's whole bound (a token per 3 bytes at least). The
  byte rate is not applied below that length: OpenAI's `" the"` would be 2.
  CJK text is one piece however long (``"人工智能是计算机科学"``) yet about a token
  a character, so a delta with more CJK characters than a token holds in practice
  (`CJK_ONE_TOKEN_CHARS`: o200k's 我们, 机器人, ました, 습니다 stay one) is a batch
  too and gets the byte rate, a token per CJK character.
* Vendors that batch tokens anyway (Anthropic, Gemini, in-house SSE) are billed
  the input estimate's bound over all they sent: the larger of a token per 3
  bytes and a token per piece plus one per 24 bytes (`Meter.relayed_tokens`).

Cost: this runs for every delta of every stream. A short delta's measure is
remembered (`MEASURED`): the common delta costs the meter about 0.06 µs more than
counting deltas did (0.09 -> 0.15 µs), an unseen one-word delta is told with str
methods (`one_piece`), the rest pay for `pieces` (about 1.2 µs for a 25-character
batch). The CJK count runs only on a delta not remembered: a length comparison for
an ASCII one (20 ns), one `bytes.translate` for the rest (under 0.5 µs).

Residual (as for the input estimate): a delta of one piece that is several tokens
from a backend that batches deltas of at most `ONE_TOKEN_CHARS` counts as one token:
a rare or random word, a word of an alphabetic non-Latin script (Cyrillic, Arabic,
Devanagari: OpenAI's single tokens there run to 17 characters, so no length tells a
batch), and a batch of 2 or 3 CJK characters. Measured with o200k's ranks on running
text, billed against the vendor: Chinese batched 2 tokens a delta 130 of 172, Arabic
42 of 51 (4 tokens a delta and more: at least the vendor's count). A token per CJK
character is the input estimate's rate, not a strict bound: cl100k (GPT-4, GPT-3.5)
spends about 1.2 a character on Chinese, up to 3 on rare ones. Its price: an honest
OpenAI token of 4 or more CJK characters (ありがとうございました) is billed a token a
character; on running text that is 0% more on Chinese, about 9% more on Japanese and
Korean, and only when the usage never comes.
"""

from __future__ import annotations

from shared.text_tokens import piece_tokens, pieces, text_bound

# Longer than nearly every single token (a long word, a run of spaces): a delta past
# it from an OpenAI-compatible backend carries several.
ONE_TOKEN_CHARS = 16
# More CJK characters (U+3000-U+D7FF: Han, kana, Hangul; their UTF-8 starts with a
# byte E3-ED) than a token holds in practice: o200k's common multi-character tokens
# are words and endings of 2 or 3 (我们, 机器人, ました, 습니다); longer ones are
# rare in running text. A delta with more is a batch.
CJK_ONE_TOKEN_CHARS = 3
_NOT_CJK_START = bytes(byte for byte in range(256) if not 0xE3 <= byte <= 0xED)


def one_piece(text: str) -> bool:
    """True only when the vendors' split patterns cut `text`, standing alone, into one
    piece, told cheaply: an ASCII word in one case (``"the"``, ``" The"``,
    ``" NASA"``), with or without one space before it; a run of spaces or of line
    breaks (an indentation, a paragraph break: one piece at a delta's end, which
    `pieces` counts as two since in a longer text the last space would lead the next
    word); a single ASCII character. False says nothing: count the pieces."""
    word = text[1:] if text[:1] == " " else text
    if word.isalpha():
        # "fooBar" is two pieces (o200k cuts before a capital after a small letter).
        return word.isascii() and (word.islower() or word.istitle() or word.isupper())
    if text.isspace():
        return not text.strip(" ") or not text.strip("\n")
    return len(text) == 1 and text.isascii()


def measure(text: str) -> tuple[int, int, int]:
    """`text` as a delta: the most tokens it can be from an OpenAI-compatible backend
    (see the module doc; at least one: an empty delta was still a token's event), its
    UTF-8 bytes and its pieces."""
    raw = text.encode()
    size = len(raw)
    count = 1 if one_piece(text) else pieces(raw)
    if len(text) > ONE_TOKEN_CHARS or (
        size > len(text) and len(raw.translate(None, _NOT_CJK_START)) > CJK_ONE_TOKEN_CHARS
    ):  # surely a batch: the whole bound (a token per CJK character)
        tokens = text_bound(size, count)
    else:  # no byte rate: OpenAI's " the" would be 2
        tokens = piece_tokens(size, count)
    return max(1, tokens), size, count


# Nearly every delta is one short token, and a few thousand tokens make most of any
# text: remembered, its measure costs a dictionary look-up (about 0.05 µs more per
# delta than counting deltas alone), not `pieces` (0.7 µs). Deltas past the length
# of a token are not kept: they are batches, seldom seen twice. The memory is
# emptied when full (no LRU bookkeeping on the hot path): the common tokens are
# back in it within a few hundred deltas.
MEMORY_ENTRIES = 4096
MEASURED: dict[str, tuple[int, int, int]] = {}


def measure_short(text: str) -> tuple[int, int, int]:
    """`measure(text)` for a delta of at most `ONE_TOKEN_CHARS`, remembered."""
    found = MEASURED.get(text)
    if found is None:
        if len(MEASURED) >= MEMORY_ENTRIES:
            MEASURED.clear()
        found = MEASURED[text] = measure(text)
    return found


def delta_measure(text: str) -> tuple[int, int, int]:
    """`measure(text)`, remembered for short deltas."""
    return measure_short(text) if len(text) <= ONE_TOKEN_CHARS else measure(text)
