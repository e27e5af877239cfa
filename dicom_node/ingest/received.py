"""The record of one received instance: everything the index writes about it, in one place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dicom_node.ingest.parser import Parsed
from dicom_node.spool import Spool
from dicom_node.state.text import storable_text
from dicom_node.study_lookup import header_lookup_keys
from dicom_node.uids import storage_key


@dataclass(frozen=True)
class Received:
    """One instance as received: its UIDs, opaque keys, spool path, size, data set hash and
    where it came from. Built once per instance by :meth:`of`; the index writer's statements
    take their values from it (:meth:`instance_values`), whichever path writes them."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    number_of_frames: int | None
    study_key: str
    series_key: str
    path: str
    """Where the file lies, relative to the spool root (built from the keys only)."""
    size: int
    sha256: str
    """Of the data set alone (:func:`dicom_node.ingest.parser.dataset_sha256`)."""
    calling_ae_title: str | None
    """As storable (at most 16 characters, no NUL)."""
    source: str
    """``dimse`` or ``stow``."""
    received_at: datetime
    series_attributes: Callable[[], dict[str, Any]] = field(repr=False, compare=False)
    """The series row's descriptive columns, decoded only when the series is new."""
    study_lookup_keys: Callable[[], dict[str, str | None]] = field(
        default=dict, repr=False, compare=False
    )
    """The study row's lookup keys (keyed hashes of accession number and patient ID,
    :mod:`dicom_node.study_lookup`), computed only when the index writes the study row."""

    @classmethod
    def of(
        cls,
        parsed: Parsed,
        *,
        salt: str,
        size: int,
        sha256: str,
        calling_ae_title: str | None,
        source: str,
        received_at: datetime,
    ) -> Received:
        """The record of ``parsed``, with its keys salted by the state database's ``salt``."""
        study_key = storage_key(parsed.study_instance_uid, salt)
        series_key = storage_key(parsed.series_instance_uid, salt)
        sop_key = storage_key(parsed.sop_instance_uid, salt, length=32)
        return cls(
            study_instance_uid=parsed.study_instance_uid,
            series_instance_uid=parsed.series_instance_uid,
            sop_instance_uid=parsed.sop_instance_uid,
            sop_class_uid=parsed.sop_class_uid,
            transfer_syntax_uid=parsed.transfer_syntax_uid,
            number_of_frames=parsed.number_of_frames,
            study_key=study_key,
            series_key=series_key,
            path=Spool.relative_path(study_key, series_key, sop_key),
            size=size,
            sha256=sha256,
            calling_ae_title=storable_text(calling_ae_title, 16),
            source=source,
            received_at=received_at,
            series_attributes=parsed.series_attributes,
            study_lookup_keys=lambda: header_lookup_keys(parsed.header, salt),
        )

    def instance_values(self) -> dict[str, Any]:
        """The ``instances`` row's columns this record decides (all but its ids)."""
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "sop_class_uid": self.sop_class_uid,
            "transfer_syntax_uid": self.transfer_syntax_uid,
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "calling_ae_title": self.calling_ae_title,
            "received_at": self.received_at,
            "source": self.source,
            "number_of_frames": self.number_of_frames,
        }
