"""What a PACS answer means for write-back: stored, duplicate, retry later, or give up.

One table for both protocols. DIMSE statuses (PS3.4 B.2.3, PS3.7 Annex C) and the
FailureReason / WarningReason codes of a STOW-RS response (PS3.18 10.5.3, which reuses them)
go through :func:`classify_status`; HTTP status codes of a whole STOW-RS request through
:func:`classify_http`.

* transient (worth retrying): ``A7xx`` out of resources, ``0213`` resource limitation, no
  response / abort, refused connection, timeouts, HTTP 408, 429 and 5xx;
* permanent (retrying cannot help): ``A9xx``, ``Cxxx``, ``0110``, ``0122``, ``0124`` and every
  other failure status, HTTP 3xx and other 4xx, 501 and 505;
* duplicate: ``0111`` (PS3.7) and ``45070`` (Microsoft's DICOM service, "already stored") -- the
  caller must check that the object already there is ours before counting it as delivered.
"""

from __future__ import annotations

from enum import Enum

from dicom_node.scu import describe_status


class Verdict(str, Enum):
    """What one status means for one instance (or one whole request)."""

    STORED = "stored"
    WARNING = "warning"
    """Stored, with a warning (coercion, elements discarded...): counts as stored."""
    DUPLICATE = "duplicate"
    """The peer says it already has this SOP instance: check it is ours."""
    TRANSIENT = "transient"
    PERMANENT = "permanent"


DUPLICATE_STATUSES = frozenset({0x0111, 45070})
"""0111: PS3.7 "Duplicate SOP Instance"; 45070 (0xB00E): Microsoft DICOM service "a DICOM instance
with the same Study, Series and SOP Instance UID has already been stored" (its conformance
statement). It sits in the B (warning) range, so it must be checked before warnings."""

TRANSIENT_HTTP = frozenset({408, 429})

# 501 Not Implemented and 505 HTTP Version Not Supported describe the server, not its load:
# retrying cannot change them.
PERMANENT_5XX = frozenset({501, 505})


def classify_status(code: int) -> Verdict:
    """Classify a DIMSE status or STOW-RS Failure/Warning Reason.

    >>> classify_status(0xA700).value, classify_status(0xC000).value, classify_status(0x0111).value
    ('transient', 'permanent', 'duplicate')
    """
    if code == 0x0000:
        return Verdict.STORED
    if code in DUPLICATE_STATUSES:
        return Verdict.DUPLICATE
    if code in (0x0001, 0x0107, 0x0116) or (code & 0xF000) == 0xB000:
        return Verdict.WARNING
    if (code & 0xFF00) == 0xA700 or code == 0x0213:
        return Verdict.TRANSIENT
    return Verdict.PERMANENT


def classify_http(code: int) -> Verdict:
    """Classify the HTTP status of a whole STOW-RS request (2xx: look at the body instead).

    >>> [classify_http(c).value for c in (200, 409, 429, 503, 501, 404)]
    ['stored', 'duplicate', 'transient', 'transient', 'permanent', 'permanent']
    """
    if 200 <= code < 300:
        return Verdict.STORED
    if code == 409:
        return Verdict.DUPLICATE
    if code in TRANSIENT_HTTP or (500 <= code < 600 and code not in PERMANENT_5XX):
        return Verdict.TRANSIENT
    return Verdict.PERMANENT


def describe_reason(code: int) -> str:
    """Human-readable name of a status / reason code, e.g. ``0xA700 Out of resources``."""
    if code == 45070:
        return "0xB00E (45070) Already stored"
    if code == 0x0213:
        return "0x0213 Resource limitation"
    return describe_status(code)


HTTP_HINTS = {
    401: "authentication failed: check the destination's credentials (user/password or token)",
    403: "forbidden: the credentials are valid but may not store here",
    404: "not found: check the DICOMweb base URL of the destination",
    405: "method not allowed: the URL is not a STOW-RS endpoint",
    413: "request too large for the server",
    415: "the server does not accept application/dicom parts",
}
