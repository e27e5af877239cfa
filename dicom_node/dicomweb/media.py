"""Media types of PS3.18: parsing ``Content-Type`` and ``Accept``, choosing what to send.

Only what the node serves is modelled: ``multipart/related; type="application/dicom"`` (with a
``transfer-syntax`` parameter) for instances, ``application/dicom+json`` for metadata and
responses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.uid import ExplicitVRLittleEndian

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
MULTIPART_RELATED = "multipart/related"

DEFAULT_TRANSFER_SYNTAX = str(ExplicitVRLittleEndian)
"""PS3.18 8.7.3.5.2: the transfer syntax of ``application/dicom`` when none is asked for."""

ANY_TRANSFER_SYNTAX = "*"


@dataclass(frozen=True)
class MediaType:
    """One media type or media range with its parameters (names lowercased)."""

    type: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def quality(self) -> float:
        try:
            return float(self.params.get("q", "1"))
        except ValueError:
            return 0.0

    def matches(self, concrete: str) -> bool:
        """Whether this range (``*/*``, ``application/*`` or exact) covers ``concrete``."""
        if self.type in ("*/*", "*"):
            return True
        major, _, minor = self.type.partition("/")
        c_major, _, c_minor = concrete.partition("/")
        return major == c_major and minor in ("*", c_minor)


def _split(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double quotes."""
    parts, current, quoted, escaped = [], [], False, False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            current.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_media_type(text: str) -> MediaType:
    """``'multipart/related; type="application/dicom"; boundary=x'`` -> MediaType."""
    head, *rest = _split(text, ";")
    params: dict[str, str] = {}
    for item in rest:
        name, sep, value = item.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        params[name.strip().lower()] = value
    return MediaType(head.strip().lower(), params)


def parse_accept(header: str | None) -> list[MediaType]:
    """The media ranges of an ``Accept`` header, best first (an absent header accepts all)."""
    if not header or not header.strip():
        return [MediaType("*/*")]
    ranges = [parse_media_type(item) for item in _split(header, ",") if item.strip()]
    ranges = [r for r in ranges if r.quality > 0]
    # sorted() is stable: equal qualities keep the client's order.
    return sorted(ranges, key=lambda r: -r.quality)


def accepts(header: str | None, concrete: str) -> bool:
    """Whether an ``Accept`` header allows the single media type ``concrete``."""
    return any(r.matches(concrete) for r in parse_accept(header))


def acceptable_transfer_syntaxes(header: str | None) -> list[str] | None:
    """Transfer syntaxes acceptable for multipart DICOM instances, per an ``Accept`` header.

    Returns the list of transfer syntax UIDs (``"*"`` meaning "as stored"), best first, or
    ``None`` when the header allows no ``multipart/related; type="application/dicom"`` at all
    (the caller answers 406). A wildcard range (``*/*``) means "as stored": a client that
    states no preference gets the bytes we have rather than a refusal.
    """
    out: list[str] = []
    for r in parse_accept(header):
        if r.type == MULTIPART_RELATED:
            inner = r.params.get("type", DICOM).lower()
            if inner not in (DICOM, "application/*", "*/*"):
                continue
            out.append(r.params.get("transfer-syntax", DEFAULT_TRANSFER_SYNTAX))
        elif r.type in ("*/*", "multipart/*"):
            out.append(ANY_TRANSFER_SYNTAX)
    return out or None


def transfer_syntax_allowed(stored: str, wanted: list[str]) -> bool:
    """Whether an instance stored in ``stored`` may be sent as is (the node never transcodes)."""
    return any(ts in (ANY_TRANSFER_SYNTAX, stored) for ts in wanted)
