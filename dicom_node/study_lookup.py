"""Finding a study by Study Instance UID, accession number or patient ID (exact match).

The Study Instance UID is already in the state database (``studies.study_instance_uid``, unique
and indexed: the node needs it to reference instances). Accession Number (0008,0050) and
Patient ID (0010,0020) are patient data and are never stored: the ``studies`` row keeps only an
HMAC-SHA256 of each (:func:`lookup_key`), keyed with the installation's secret, the same
``uid_salt`` of the state database that salts the study keys
(:func:`dicom_node.uids.storage_key`). Without that secret, a copy of the database does not let
anyone confirm an identifier they already know; with it, a lookup computes the same HMAC of the
identifier it is asked for and compares keys.

The keys are filled when the index first creates a study's row from a received instance
(:mod:`dicom_node.ingest.index`); a study indexed before revision 0003 of the schema has NULL
keys until another instance of it arrives, and is found by Study Instance UID only.

Identifiers are patient data: this module never logs one, and the audit record of a lookup
(:func:`record_lookup`) names the kind of identifier searched and how many jobs matched, never
the value.
"""

from __future__ import annotations

import hashlib
import hmac
from enum import Enum
from typing import Any

from sqlalchemy import ColumnElement

from dicom_node import audit
from dicom_node.state import Database, Study

STUDY_LOOKUP = "study-lookup"
"""Audit event name of a lookup (stable: log searches rely on it)."""

_ACCESSION_NUMBER_TAG = 0x00080050
_PATIENT_ID_TAG = 0x00100020
_PADDING = " \x00"
"""Leading and trailing spaces of SH and LO values are not significant (PS3.5 6.2); a NUL pads
some senders' values. Both are stripped from received values and from queries alike."""


class LookupKind(str, Enum):
    """Which identifier a lookup is by (the names of the ``GET /api/studies`` parameters)."""

    STUDY_INSTANCE_UID = "study_instance_uid"
    ACCESSION_NUMBER = "accession_number"
    PATIENT_ID = "patient_id"


def normalize(value: str) -> str:
    """``value`` without its insignificant padding (the form that is hashed and compared)."""
    return value.strip(_PADDING)


def lookup_key(secret: str, kind: LookupKind, value: str) -> str:
    """The keyed hash stored for identifier ``value`` of ``kind`` (hex HMAC-SHA256).

    The kind is part of the message, so an accession number and a patient ID that happen to be
    equal give different keys.

    >>> lookup_key("s", LookupKind.PATIENT_ID, " 42 ") == lookup_key("s", LookupKind.PATIENT_ID, "42")
    True
    >>> lookup_key("s", LookupKind.PATIENT_ID, "42") == lookup_key("s", LookupKind.ACCESSION_NUMBER, "42")
    False
    """
    message = f"{kind.value}\x00{normalize(value)}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def header_lookup_keys(header: Any, secret: str) -> dict[str, str | None]:
    """The ``studies`` columns of the lookup keys for a received instance's header (a pydicom
    ``Dataset``): None for an identifier that is absent, empty or cannot be decoded (that never
    refuses an instance; the study is then found by its UID only)."""
    return {
        "accession_number_hmac": _key_of(
            header, _ACCESSION_NUMBER_TAG, secret, LookupKind.ACCESSION_NUMBER
        ),
        "patient_id_hmac": _key_of(header, _PATIENT_ID_TAG, secret, LookupKind.PATIENT_ID),
    }


def _key_of(header: Any, tag: int, secret: str, kind: LookupKind) -> str | None:
    try:
        elem = header.get(tag)  # by tag, like the parser: decoded with the data set's charset
        value = None if elem is None else elem.value
    except Exception:  # a value that cannot be decoded; its type only would be worth logging
        return None
    if value is None or isinstance(value, bytes):
        return None
    text = normalize(str(value))
    return lookup_key(secret, kind, text) if text else None


def study_condition(secret: str, kind: LookupKind, value: str) -> ColumnElement[bool]:
    """The ``WHERE`` clause on :class:`~dicom_node.state.Study` for one lookup."""
    if kind is LookupKind.STUDY_INSTANCE_UID:
        return Study.study_instance_uid == normalize(value)
    key = lookup_key(secret, kind, value)
    if kind is LookupKind.ACCESSION_NUMBER:
        return Study.accession_number_hmac == key
    return Study.patient_id_hmac == key


def record_lookup(
    db: Database,
    kind: LookupKind,
    *,
    actor: str,
    via: str,
    jobs: int,
    study_keys: list[str],
) -> None:
    """Audit one lookup: who, by which kind of identifier, through which door (``api``,
    ``dashboard``, ``cli``), and how many studies and jobs matched; the study key when exactly
    one study did (an opaque key). Never the identifier itself."""
    audit.record(
        db,
        STUDY_LOOKUP,
        actor=actor,
        outcome="success",
        study_key=study_keys[0] if len(study_keys) == 1 else None,
        by=kind.value,
        via=via,
        studies=len(study_keys),
        jobs=jobs,
    )
