"""What checking a part's base64 costs (`shared.media.is_base64`), on the event loop of
either service: a 1 MiB image, file or audio part whose last character is wrong was
checked by a regular expression that backtracked through every group before failing:
45 ms of CPU for a body the edge refuses without using its token, so again and again
(20 ms for a valid one). One strict `binascii` pass (C, ~3 ms a MiB) decides it now,
exactly as canonical base64 (RFC 4648 §4) is defined."""

from __future__ import annotations

import binascii
import itertools
import re
from typing import Any

import pytest

from shared import media
from shared.input_size import InputRejected, check_parts

# The definition: groups of 4 from the alphabet, the last one padded to 4 with "=".
CANONICAL = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def test_a_parts_base64_is_checked_in_one_c_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    passes: list[tuple[int, bool]] = []
    decode = binascii.a2b_base64

    def counted(data: Any, *, strict_mode: bool = False) -> bytes:
        passes.append((len(data), strict_mode))
        return decode(data, strict_mode=strict_mode)

    monkeypatch.setattr(binascii, "a2b_base64", counted)
    data = "A" * (1 << 20)
    bad = [{"type": "input_audio", "input_audio": {"format": "wav", "data": data[1:] + "!"}}]
    with pytest.raises(InputRejected) as refused:
        check_parts(bad, "messages[0].content")
    assert refused.value.code == "invalid_content"
    url = f"data:image/png;base64,{data}"
    assert check_parts([{"type": "image_url", "image_url": {"url": url}}], "m") == {"vision"}
    assert passes == [(len(data), True), (len(data), True)]


@pytest.mark.parametrize(
    ("alphabet", "longest"), [("AB/+=-_ \né\x00", 5), ("A=/", 12)], ids=["mixed", "padding"]
)
def test_the_check_is_canonical_base64_exactly(alphabet: str, longest: int) -> None:
    """Every string from an alphabet of valid, padding, URL-safe, space, control and
    non-ASCII characters (and, longer, of padding mixed with data): accepted exactly
    when canonical ("AAAA====" is not, which a strict decode alone takes)."""
    for length in range(longest + 1):
        for chars in itertools.product(alphabet, repeat=length):
            data = "".join(chars)
            assert media.is_base64(data) == bool(data and CANONICAL.fullmatch(data)), repr(data)
