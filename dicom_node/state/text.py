"""Received text made storable in every state database backend.

PostgreSQL ``text``/``varchar`` refuses the NUL character outright ("invalid byte sequence for
encoding UTF8: 0x00"), and its UTF-8 encoder refuses lone surrogates; SQLite stores both. A value
copied from a dataset (a description padded with NUL, as some modalities send) must not turn
every store of that series into "retry later": the descriptive fields keep their readable part
instead. UIDs are never cleaned here: they are validated and refused (C002) instead, since a
changed UID would name another object.
"""

from __future__ import annotations

import re

_REFUSED = re.compile("[\x00\ud800-\udfff]")


def storable_text(value: str | None, limit: int | None = None) -> str | None:
    """``value`` without the code points PostgreSQL refuses, cut to ``limit`` characters.

    NUL is removed (it pads, it does not separate), a lone surrogate becomes U+FFFD like any
    other undecodable byte, surrounding spaces are trimmed; an empty result is ``None``.
    """
    if value is None:
        return None
    cleaned = _REFUSED.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", value).strip()
    if limit is not None:
        cleaned = cleaned[:limit].rstrip()
    return cleaned or None
