"""UIDs: validation, opaque storage keys, and deterministic derivation of output UIDs.

UIDs arrive from the network and are attacker input. They are never used as file or directory
names: the spool is keyed by salted hashes (:func:`storage_key`), and a UID is checked against
the PS3.5 UI grammar before it is stored at all.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable

_DERIVE_NAMESPACE = uuid.UUID("6f1c6a0e-3b7d-5d2a-9c55-2f1d0e7a4b21")
"""Fixed namespace of dicom-node's derived UIDs (never change it: UIDs already sent depend on it)."""

UID_MAX_LENGTH = 64
"""PS3.5 §9.1: a UID is at most 64 characters."""

# PS3.5 §9.1: components of digits separated by single dots; no leading zero unless the
# component is exactly "0"; no empty component.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# Real-world UIDs often break the leading-zero rule; we accept them (they are harmless as
# data), but never anything other than digits and single dots.
_UID_LENIENT_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def uid_problem(value: object, *, strict: bool = False) -> str | None:
    """Return why ``value`` is not an acceptable UID, or ``None`` when it is.

    The reason never quotes the value (it may be hostile or identifying).

    >>> uid_problem("1.2.840.10008.1.1") is None
    True
    >>> uid_problem("..")
    'contains characters other than digits and single dots'
    >>> uid_problem("1." + "1" * 70)
    'is longer than 64 characters'
    """
    if not isinstance(value, str):
        return "is missing or not text"
    if value == "":
        return "is empty"
    if len(value) > UID_MAX_LENGTH:
        return f"is longer than {UID_MAX_LENGTH} characters"
    pattern = _UID_RE if strict else _UID_LENIENT_RE
    if not pattern.match(value):
        return "contains characters other than digits and single dots"
    return None


def is_valid_uid(value: object, *, strict: bool = False) -> bool:
    """True when ``value`` is a UID we accept (see :func:`uid_problem`)."""
    return uid_problem(value, strict=strict) is None


def storage_key(uid: str, salt: str, length: int = 24) -> str:
    """An opaque, filesystem-safe key for a UID: hex of a salted SHA-256.

    The salt is per installation (kept in the state database), so keys in logs and paths do
    not let anyone confirm a UID they already know.
    """
    digest = hashlib.sha256(f"{salt}\x00{uid}".encode()).hexdigest()
    return digest[:length]


def input_set_hash(sop_instance_uids: Iterable[str]) -> str:
    """A stable hash of a set of SOP Instance UIDs (order does not matter)."""
    h = hashlib.sha256()
    for uid in sorted(set(sop_instance_uids)):
        h.update(uid.encode())
        h.update(b"\n")
    return h.hexdigest()


def derive_uid(*parts: str) -> str:
    """A deterministic UID (``2.25.<int>``) derived from ``parts``.

    The same parts always give the same UID, so a retried job writes the same objects again
    instead of a second copy.

    >>> derive_uid("a", "b") == derive_uid("a", "b")
    True
    >>> derive_uid("a", "b") != derive_uid("a", "c")
    True
    >>> derive_uid("ab", "c") != derive_uid("a", "bc")
    True
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    # A name-based (RFC 4122 version 5) UUID as a 2.25 UID. pydicom's generate_uid() cannot be
    # used: with prefix=None it ignores entropy_srcs and returns a random UUID. The parts are
    # JSON-encoded so that ("ab", "c") and ("a", "bc") differ.
    name = json.dumps(["dicom-node-output-v1", *parts], ensure_ascii=False)
    return f"2.25.{uuid.uuid5(_DERIVE_NAMESPACE, name).int}"
