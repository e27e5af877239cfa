"""Validate-and-store: the one path every received instance takes (C-STORE and STOW-RS).

Given a complete Part 10 file in the spool's temporary area (or in memory),
:meth:`Ingestor.ingest_file` / :meth:`Ingestor.ingest_bytes`

1. refuse it when it is over the size cap or the spool is below its free-space floor (A700);
2. zero the 128-byte preamble (a preamble can carry an executable header, CVE-2019-11687);
3. parse and bound it (:mod:`dicom_node.ingest.parser`: C000/C001/C002, A700 for bombs);
4. check its SOP Class/Instance UIDs against the DIMSE command (A900);
5. fsync the file, link it under a name built from salted hashes and fsync the directory
   (:meth:`dicom_node.spool.Spool.claim`), and commit the index rows
   (:mod:`dicom_node.ingest.index`) -- and only then report success.

A second copy of a stored SOP instance is handled by ``scp.duplicate_policy`` (PS3.7 C.4.1).
Nothing here logs or raises with patient data: messages name opaque keys and reasons only.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from dicom_node.dimse_status import (
    STATUS_DUPLICATE_SOP_INSTANCE,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
)
from dicom_node.errors import IngestError, StorageError
from dicom_node.ingest.index import IndexWriter
from dicom_node.ingest.parser import dataset_sha256, parse_part10, parse_part10_bytes
from dicom_node.ingest.received import Received
from dicom_node.settings import DuplicatePolicy, Settings
from dicom_node.spool import Spool
from dicom_node.state import Database, DuplicateEvent, Instance, Study, utcnow

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    """What happened to one instance."""

    status: int
    """The DIMSE status to answer (:mod:`dicom_node.dimse_status`)."""
    reason: str | None = None
    study_key: str | None = None
    duplicate: str | None = None
    """None, or the action taken: ignored | kept-first | overwritten | rejected | restored
    (the copy of an instance whose file retention had removed)."""
    new_study: bool = False

    @property
    def ok(self) -> bool:
        """The sender gets Success: stored, or a copy the duplicate policy accepts."""
        return self.status == STATUS_SUCCESS


@dataclass(frozen=True)
class _Expected:
    """What the DIMSE command (or the STOW-RS URL) says the instance is."""

    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None


class Ingestor:
    """Stores received instances in the spool and the index. Thread-safe; one per process."""

    def __init__(self, settings: Settings, db: Database, spool: Spool) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.max_bytes = settings.scp.max_instance_bytes
        self.max_decoded = settings.scp.max_decoded_bytes
        # A deflated data set is held to both caps: what it inflates to is also what is stored.
        self.max_inflated = min(self.max_bytes, self.max_decoded)
        self.policy = settings.scp.duplicate_policy
        self.index = IndexWriter(db)
        self._salt = db.salt

    def ingest_file(
        self,
        temp: Path,
        *,
        calling_ae_title: str | None,
        source: str = "dimse",
        expected_sop_class_uid: str | None = None,
        expected_sop_instance_uid: str | None = None,
        expected_study_instance_uid: str | None = None,
    ) -> IngestResult:
        """Validate and store the Part 10 file ``temp`` (which this call consumes).

        ``temp`` must be inside the spool's temporary area (same file system as the spool).
        """
        expected = _Expected(
            expected_sop_class_uid, expected_sop_instance_uid, expected_study_instance_uid
        )
        return self._guarded(temp, None, calling_ae_title, source, expected)

    def ingest_bytes(
        self,
        data: bytes | bytearray,
        *,
        calling_ae_title: str | None,
        source: str = "dimse",
        expected_sop_class_uid: str | None = None,
        expected_sop_instance_uid: str | None = None,
        expected_study_instance_uid: str | None = None,
    ) -> IngestResult:
        """Validate and store a Part 10 file held in memory (written once, fsynced).

        The receive path for instances that arrived in memory: it parses and hashes the bytes
        it already has instead of reading a file back.
        """
        expected = _Expected(
            expected_sop_class_uid, expected_sop_instance_uid, expected_study_instance_uid
        )
        return self._guarded(None, data, calling_ae_title, source, expected)

    def _guarded(
        self,
        temp: Path | None,
        data: bytes | bytearray | None,
        calling_ae_title: str | None,
        source: str,
        expected: _Expected,
    ) -> IngestResult:
        written: list[Path] = [] if temp is None else [temp]
        try:
            return self._ingest(temp, data, written, calling_ae_title, source, expected)
        except IngestError as exc:
            for path in written:
                self.spool.discard(path)
            LOGGER.warning("instance refused (status 0x%04X): %s", exc.status, exc)
            return IngestResult(status=exc.status, reason=str(exc))
        except OSError as exc:
            for path in written:
                self.spool.discard(path)
            LOGGER.error(
                "instance refused (status 0x%04X): storage error %s",
                STATUS_OUT_OF_RESOURCES,
                exc.strerror,
            )
            return IngestResult(
                status=STATUS_OUT_OF_RESOURCES, reason=f"storage error: {exc.strerror}"
            )

    def _ingest(
        self,
        temp: Path | None,
        data: bytes | bytearray | None,
        written: list[Path],
        calling_ae_title: str | None,
        source: str,
        expected: _Expected,
    ) -> IngestResult:
        size = len(data) if data is not None else _size_of(temp)
        if size > self.max_bytes:
            raise StorageError(
                f"instance of {size} bytes exceeds the size cap of {self.max_bytes} bytes"
            )
        self.spool.check_free_space(size if data is not None else 0)

        caps = {"max_inflated_bytes": self.max_inflated, "max_decoded_bytes": self.max_decoded}
        if data is not None:
            parsed = parse_part10_bytes(data, **caps)
        else:
            assert temp is not None
            parsed = parse_part10(temp, **caps)
        parsed.check_expected(
            expected.sop_class_uid, expected.sop_instance_uid, expected.study_instance_uid
        )

        if data is not None:
            sha = dataset_sha256(data, parsed.dataset_offset)
            temp = self.spool.write_temp(data)  # zeroed preamble, fsynced
            written.append(temp)
        else:
            assert temp is not None
            sha = dataset_sha256(temp, parsed.dataset_offset)
            self.spool.sync_file(temp)
        received = Received.of(
            parsed,
            salt=self._salt,
            size=size,
            sha256=sha,
            calling_ae_title=calling_ae_title,
            source=source,
            received_at=utcnow(),
        )

        # The claim is held until the index row is committed: a different copy of the same
        # instance arriving meanwhile (another association or receiver process) waits for it,
        # then sees the row and is handled as a duplicate, instead of taking the placed but
        # not yet indexed file for a crash leftover and replacing it.
        with self.spool.claim(temp, received.path) as placed:
            try:
                indexed = self.index.add(
                    received,
                    placed=placed,
                    adopt=lambda: self.spool.replace(temp, received.path),
                )
                if not indexed.inserted:
                    return self._duplicate(received, temp, indexed.placed)
                return IngestResult(
                    STATUS_SUCCESS, study_key=received.study_key, new_study=indexed.new_study
                )
            except (DBAPIError, sqlite3.Error) as exc:
                # The index could not be committed: revoke the file we placed (dcm4chee does
                # the same) so the spool never holds an instance we did not acknowledge.
                if placed:
                    self.spool.remove(received.path)
                self.spool.discard(temp)
                LOGGER.error("index commit failed: %s", type(exc).__name__)
                raise StorageError("state database unavailable") from exc

    def _duplicate(self, received: Received, temp: Path, placed: bool) -> IngestResult:
        """A copy of an indexed SOP instance, handled by ``scp.duplicate_policy``."""
        with self.db.session() as s:
            existing = s.scalar(
                select(Instance).where(Instance.sop_instance_uid == received.sop_instance_uid)
            )
            assert existing is not None
            return self._settle(s, existing, received, temp, placed)

    def _settle(
        self, s: Session, existing: Instance, received: Received, temp: Path, placed: bool
    ) -> IngestResult:
        identical = existing.sha256 == received.sha256
        moved = existing.path != received.path  # same SOP Instance UID, other study/series
        now = received.received_at
        status = STATUS_SUCCESS
        if existing.purged_at is not None and not moved:
            # Its file was removed by retention (dicom_node.retention): nothing is kept to
            # compare with, so this copy takes its place and the study is completed again.
            action = "restored"
            if not placed:
                self.spool.replace(temp, received.path)
            existing.sha256, existing.size, existing.received_at = (
                received.sha256,
                received.size,
                now,
            )
            existing.transfer_syntax_uid = received.transfer_syntax_uid
            existing.purged_at = None
            s.execute(
                update(Study)
                .where(Study.id == existing.study_id)
                .values(dirty=True, last_received_at=now)
            )
        elif identical and not moved:
            action = "ignored"
            self.spool.discard(temp)
        elif self.policy is DuplicatePolicy.OVERWRITE:
            action = "overwritten"
            if not placed:
                self.spool.replace(temp, received.path)
            if moved:
                self.spool.remove(existing.path)
            existing.sha256, existing.size, existing.received_at = (
                received.sha256,
                received.size,
                now,
            )
            existing.transfer_syntax_uid = received.transfer_syntax_uid
            existing.path = received.path
            s.execute(
                update(Study)
                .where(Study.id == existing.study_id)
                .values(dirty=True, last_received_at=now)
            )
        else:
            # keep-first and reject both leave the stored instance untouched
            if placed and moved:
                self.spool.remove(received.path)
            self.spool.discard(temp)
            if self.policy is DuplicatePolicy.REJECT:
                action = "rejected"
                status = STATUS_DUPLICATE_SOP_INSTANCE
            else:
                action = "kept-first"
        s.add(
            DuplicateEvent(
                instance_id=existing.id,
                received_at=now,
                identical=identical,
                action=action,
                sha256=received.sha256,
                calling_ae_title=received.calling_ae_title,
            )
        )
        if not identical:
            LOGGER.warning(
                "study %s: instance received again with different content (%s)",
                received.study_key,
                action,
            )
        reason = None
        if status != STATUS_SUCCESS:
            reason = "a different instance with this SOP Instance UID is stored"
        return IngestResult(
            status=status, reason=reason, study_key=received.study_key, duplicate=action
        )


def _size_of(temp: Path | None) -> int:
    assert temp is not None
    return temp.stat().st_size
