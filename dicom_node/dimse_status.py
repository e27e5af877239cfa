"""DIMSE status codes and what they mean: the one table for the SCP, the SCU and write-back.

A DIMSE response carries a 16-bit Status (PS3.7 Annex C). Its class decides what the other side
does with it:

* **success** ``0000``;
* **warning** ``0001``, ``0107``, ``0116`` and ``Bxxx`` (PS3.7 C.4.1, PS3.4 B.2.3: the instance
  was stored, with coercion ``B000``, elements discarded ``B006``, or a data set that does not
  match its SOP class ``B007``);
* **failure** everything else, among them ``0110`` processing failure, ``0111`` duplicate SOP
  instance, ``0122`` SOP class not supported, ``0124`` not authorised, ``0213`` resource
  limitation, ``A7xx`` out of resources, ``A9xx`` data set does not match the SOP class and
  ``Cxxx`` cannot understand (PS3.4 B.2.3);
* **cancel** ``FE00`` and **pending** ``FF00`` / ``FF01`` (C-FIND and the other multi-response
  services, PS3.7 C.1).

STOW-RS reuses these codes as the FailureReason / WarningReason of its response (PS3.18 10.5.3),
so the same table reads them. For write-back, :func:`classify_status` turns a status into a
:class:`Verdict` (stored, warning, duplicate, retry later, give up); :func:`classify_http` does
the same for the HTTP status of a whole STOW-RS request:

* transient (worth retrying): ``A7xx`` out of resources, ``0213`` resource limitation, no
  response / abort, refused connection, timeouts, HTTP 408, 429 and 5xx;
* permanent (retrying cannot help): ``A9xx``, ``Cxxx``, ``0110``, ``0122``, ``0124`` and every
  other failure status, HTTP 3xx and other 4xx, 501 and 505;
* duplicate: ``0111`` (PS3.7) and ``45070`` (Microsoft's DICOM service, "already stored") -- the
  caller must check that the object already there is ours before counting it as delivered.
"""

from __future__ import annotations

from enum import Enum

STATUS_SUCCESS = 0x0000

# -- warnings (stored) ---------------------------------------------------------------------------
STATUS_WARNING = 0x0001
"""PS3.7 C.4: a warning with no more specific code (e.g. optional attributes not supported)."""
STATUS_ATTRIBUTE_LIST_ERROR = 0x0107
STATUS_ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116
STATUS_COERCION = 0xB000
"""PS3.4 B.2.3: stored, with data elements coerced."""
STATUS_ELEMENTS_DISCARDED = 0xB006
STATUS_DATASET_MISMATCH_STORED = 0xB007
"""PS3.4 B.2.3: stored, though the data set does not match the SOP class."""
STATUS_ALREADY_STORED = 45070
"""0xB00E: Microsoft's DICOM service, "a DICOM instance with the same Study, Series and SOP
Instance UID has already been stored" (its conformance statement). A warning by its range, but
it means "duplicate": :func:`classify_status` looks at it before the warnings."""

# -- failures ------------------------------------------------------------------------------------
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111
"""PS3.7 C.4.1. The node returns it only with ``scp.duplicate_policy = "reject"``."""
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_NOT_AUTHORIZED = 0x0124
STATUS_RESOURCE_LIMITATION = 0x0213
STATUS_OUT_OF_RESOURCES = 0xA700
"""PS3.4 B.2.3: refused for now (spool full, over a size cap, state database down)."""
STATUS_DATASET_MISMATCH = 0xA900
"""PS3.4 B.2.3: the data set does not match the SOP class (or the command's UIDs)."""
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_MISSING_UID = 0xC001
"""In the Cxxx "cannot understand" range: a required UID is missing."""
STATUS_INVALID_UID = 0xC002
"""In the Cxxx "cannot understand" range: a UID is malformed."""
STATUS_CANNOT_DECODE = 0xC210
"""pynetdicom's: the received data set could not be decoded."""
STATUS_HANDLER_ERROR = 0xC211
"""pynetdicom's: the receiver's handler raised."""

# -- multi-response services ---------------------------------------------------------------------
STATUS_CANCEL = 0xFE00
STATUS_PENDING = 0xFF00
STATUS_PENDING_WARNING = 0xFF01
"""Pending, some optional keys not supported (C-FIND, PS3.4 C.4.1.1.4)."""

# -- no status at all (negative: never a 16-bit DIMSE status) -------------------------------------
STATUS_NO_RESPONSE = -1
"""Our marker for "no status received" (timeout, abort, association lost)."""
STATUS_NOT_SENT = -2
"""Our marker for "never sent" (could not associate, or the peer refused the context)."""

_WARNINGS = frozenset(
    {STATUS_WARNING, STATUS_ATTRIBUTE_LIST_ERROR, STATUS_ATTRIBUTE_VALUE_OUT_OF_RANGE}
)
_PENDING = frozenset({STATUS_PENDING, STATUS_PENDING_WARNING})

_NAMES = {
    STATUS_SUCCESS: "Success",
    STATUS_WARNING: "Warning",
    STATUS_ATTRIBUTE_LIST_ERROR: "Attribute list error",
    STATUS_ATTRIBUTE_VALUE_OUT_OF_RANGE: "Attribute value out of range",
    STATUS_COERCION: "Coercion of data elements",
    STATUS_ELEMENTS_DISCARDED: "Elements discarded",
    STATUS_DATASET_MISMATCH_STORED: "Data set does not match SOP class (stored)",
    STATUS_ALREADY_STORED: "Already stored",
    STATUS_PROCESSING_FAILURE: "Processing failure",
    STATUS_DUPLICATE_SOP_INSTANCE: "Duplicate SOP instance",
    STATUS_SOP_CLASS_NOT_SUPPORTED: "SOP class not supported",
    STATUS_NOT_AUTHORIZED: "Not authorised",
    STATUS_RESOURCE_LIMITATION: "Resource limitation",
    STATUS_OUT_OF_RESOURCES: "Out of resources",
    STATUS_DATASET_MISMATCH: "Data set does not match SOP class",
    STATUS_CANNOT_UNDERSTAND: "Cannot understand",
    STATUS_MISSING_UID: "Cannot understand: required UID missing",
    STATUS_INVALID_UID: "Cannot understand: invalid UID",
    STATUS_CANNOT_DECODE: "Cannot decode dataset",
    STATUS_HANDLER_ERROR: "Error in the receiver's handler",
    STATUS_CANCEL: "Cancel",
    STATUS_PENDING: "Pending",
    STATUS_PENDING_WARNING: "Pending (optional keys not supported)",
}


class Category(str, Enum):
    """The status class of PS3.7 Annex C."""

    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"
    CANCEL = "cancel"
    PENDING = "pending"


def category(status: int) -> Category:
    """The class of a DIMSE status; an unknown code (or a marker) is a failure.

    >>> [category(c).value for c in (0x0000, 0xB007, 0xA700, 0xFE00, 0xFF01)]
    ['success', 'warning', 'failure', 'cancel', 'pending']
    """
    if status == STATUS_SUCCESS:
        return Category.SUCCESS
    if status in _WARNINGS or (status > 0 and (status & 0xF000) == 0xB000):
        return Category.WARNING
    if status == STATUS_CANCEL:
        return Category.CANCEL
    if status in _PENDING:
        return Category.PENDING
    return Category.FAILURE


def is_cannot_understand(status: int) -> bool:
    """Whether ``status`` is in the Cxxx "cannot understand" range (PS3.4 B.2.3)."""
    return status > 0 and (status & 0xF000) == 0xC000


def describe(status: int) -> str:
    """A status as an operator reads it, e.g. ``0xA700 Out of resources`` (no patient data).

    >>> describe(0xC123), describe(45070), describe(STATUS_NOT_SENT)
    ('0xC123 Cannot understand', '0xB00E (45070) Already stored', 'not sent')
    """
    if status == STATUS_NO_RESPONSE:
        return "no response (timeout or abort)"
    if status == STATUS_NOT_SENT:
        return "not sent"
    name = _NAMES.get(status)
    if name is None:
        if is_cannot_understand(status):
            name = "Cannot understand"
        elif status & 0xFF00 == STATUS_OUT_OF_RESOURCES:
            name = "Out of resources"
        elif status & 0xFF00 == STATUS_DATASET_MISMATCH:
            name = "Data set does not match SOP class"
        else:
            name = "Status"
    if status == STATUS_ALREADY_STORED:
        return f"0x{status:04X} ({status}) {name}"
    return f"0x{status:04X} {name}"


# -- what a status means for write-back -----------------------------------------------------------


class Verdict(str, Enum):
    """What one status means for one instance (or one whole request)."""

    STORED = "stored"
    WARNING = "warning"
    """Stored, with a warning (coercion, elements discarded...): counts as stored."""
    DUPLICATE = "duplicate"
    """The peer says it already has this SOP instance: check it is ours."""
    TRANSIENT = "transient"
    PERMANENT = "permanent"


DUPLICATE_STATUSES = frozenset({STATUS_DUPLICATE_SOP_INSTANCE, STATUS_ALREADY_STORED})
"""Both mean "the peer has an instance with this SOP Instance UID" (see the constants)."""


def classify_status(code: int) -> Verdict:
    """Classify a DIMSE status or STOW-RS Failure/Warning Reason for write-back.

    >>> classify_status(0xA700).value, classify_status(0xC000).value, classify_status(0x0111).value
    ('transient', 'permanent', 'duplicate')
    """
    if code in DUPLICATE_STATUSES:
        return Verdict.DUPLICATE
    kind = category(code)
    if kind is Category.SUCCESS:
        return Verdict.STORED
    if kind is Category.WARNING:
        return Verdict.WARNING
    if (code & 0xFF00) == STATUS_OUT_OF_RESOURCES or code == STATUS_RESOURCE_LIMITATION:
        return Verdict.TRANSIENT
    return Verdict.PERMANENT


# -- the HTTP status of a whole STOW-RS request (PS3.18 10.5.3) -----------------------------------

TRANSIENT_HTTP = frozenset({408, 429})

# 501 Not Implemented and 505 HTTP Version Not Supported describe the server, not its load:
# retrying cannot change them.
PERMANENT_5XX = frozenset({501, 505})


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


HTTP_HINTS = {
    401: "authentication failed: check the destination's credentials (user/password or token)",
    403: "forbidden: the credentials are valid but may not store here",
    404: "not found: check the DICOMweb base URL of the destination",
    405: "method not allowed: the URL is not a STOW-RS endpoint",
    413: "request too large for the server",
    415: "the server does not accept application/dicom parts",
}
