"""Text from clients and providers made storable once, where it enters Tollgate.

JSON may carry any code point as an escape, including lone surrogates (``"\\ud800"``) that
no UTF-8 encoder accepts, and NUL, which Postgres cannot store in a text column. Every string
read from a request body, a form field, a JWT claim or a provider's answer passes through
:func:`safe_text` before it can reach a :class:`~tollgate.ledger.records.UsageRecord`, so
building or storing the record cannot fail on it. Header values are already safe: they are
decoded from bytes with invalid UTF-8 replaced.
"""

from __future__ import annotations

import re

__all__ = ["REPLACEMENT", "safe_text"]

REPLACEMENT = "\ufffd"
# Lone surrogates are the only code points of a Python str UTF-8 cannot encode.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def safe_text(text: str) -> str:
    """``text`` with lone surrogates and NUL replaced by U+FFFD; ``text`` itself (no copy)
    when there is nothing to replace, which is nearly always."""
    if text.isascii():
        if "\x00" not in text:
            return text
    else:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            if "\x00" not in text:
                return text
    return _UNSTORABLE.sub(REPLACEMENT, text)
