"""One spelling per email address (pure): what is stored, looked up and counted.

An address is an account's identity (unique across the platform) and its login
limit's key (`login_limits`, per email). Lowercasing alone left many spellings of one
address: canonically equivalent ones ("é" as one character or as "e" and a combining
accent, which systems and keyboards produce either way) and compatibility ones
(fullwidth letters, a fullwidth "@"), each a new account shown with the same
address. So the canonical form is NFKC, lowercased, NFKC again (lowercasing can
leave a character that composes): every spelling of one address, one string.

A stored address also refuses what makes it show as another: control and format
characters (a right-to-left override turns the text around; zero-width spaces,
joiners and soft hyphens are invisible) and any other space. Lookalikes from other
scripts (a Cyrillic a, U+0430, for a Latin one) stay distinct addresses, as they are to a
mail server.

Its length is checked once canonical: lowercasing can lengthen a text ("İ" becomes
two characters), and the column holds `EMAIL_MAX`.
"""

from __future__ import annotations

import unicodedata

from control_plane.errors import ValidationFailed

EMAIL_MAX = 320  # the users.email column; RFC 5321's 64 + 1 + 255


def canonical_email(value: str) -> str:
    """The one spelling of `value` (surrounding space dropped, NFKC, lowercase)."""
    folded = unicodedata.normalize("NFKC", value).lower()
    # Stripped last: a compatibility character can become a space and a mark.
    return unicodedata.normalize("NFKC", folded).strip()


def _shows_as_another(char: str) -> bool:
    # C*: control, format (bidi overrides, zero-width, soft hyphen), unassigned,
    # private use, surrogates; Z*: any space or separator.
    return unicodedata.category(char)[0] in "CZ"


def normalise_email(value: str) -> str:
    """`value` as an account's address, canonical; 422 naming `email` unless it reads
    as one (a local part, "@", a dotted domain, nothing invisible, at most
    `EMAIL_MAX` characters)."""
    email = canonical_email(value)
    local, at, domain = email.partition("@")
    if (
        not at
        or not local
        or "." not in domain
        or any(c.isspace() or _shows_as_another(c) for c in email)
    ):
        raise ValidationFailed("email", "must be an email address")
    if len(email) > EMAIL_MAX:
        raise ValidationFailed("email", f"must be at most {EMAIL_MAX} characters")
    return email
