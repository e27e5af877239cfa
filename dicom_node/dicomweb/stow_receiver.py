"""STOW-RS received (PS3.18 10.5): a ``multipart/related`` body, streamed part by part into the
ingest path. (Sending results to a PACS by STOW-RS is :mod:`dicom_node.delivery.stow`.)

Each body part is written to a temporary file in the spool (never held in memory whole), capped
at ``scp.max_instance_bytes``, made a PS3.10 file when it lacks file meta, and handed to
:meth:`dicom_node.ingest.Ingestor.ingest_file` as soon as it ends, exactly as a C-STORE would be.
The per-instance DIMSE status becomes the FailureReason of the PS3.18 response, and the set of
statuses decides the HTTP status (:func:`http_status`).

Before anything parses a part whole, :func:`dicom_node.dataset_io.check_part10` bounds it: a
Deflated data set is inflated as a stream and refused past ``scp.max_decoded_bytes`` (a deflate
bomb never reaches memory), and pixel data declaring more than that is refused (a pixel bomb).
Such a part fails with A700 and, not being worth a retry, HTTP 409 rather than 503.

Nothing here logs UIDs or patient data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from python_multipart.multipart import MultipartParseError, MultipartParser

from dicom_node.dataset_io import check_part10, open_part10
from dicom_node.dicomweb.media import DICOM, parse_media_type
from dicom_node.dicomweb.part10 import ensure_part10
from dicom_node.dimse_status import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    is_cannot_understand,
)
from dicom_node.errors import StorageError
from dicom_node.ingest import Ingestor, IngestResult
from dicom_node.spool import Spool
from dicom_node.uids import uid_problem

LOGGER = logging.getLogger(__name__)

MAX_PREAMBLE_BYTES = 64 * 1024
"""A multipart preamble (text before the first boundary, RFC 2046 5.1.1) longer than this is
refused: a body that never shows its boundary is not read to the end into memory."""

MAX_PART_HEADER_COUNT = 32

# Why a part was not stored before it reached the ingest path (reported as FailureReason).
_REASON_TOO_LARGE = "too-large"


@dataclass
class PartOutcome:
    """What happened to one body part."""

    status: int
    reason: str | None = None
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    study_key: str | None = None
    new_study: bool = False
    duplicate: str | None = None
    size: int = 0
    too_large: bool = False
    over_decode_cap: bool = False
    """Refused because it inflates or decodes beyond ``scp.max_decoded_bytes``."""

    @property
    def stored(self) -> bool:
        return self.status == STATUS_SUCCESS

    def named(self, names: Names) -> PartOutcome:
        self.sop_class_uid = names.sop_class_uid
        self.sop_instance_uid = names.sop_instance_uid
        self.study_instance_uid = names.study_instance_uid
        self.series_instance_uid = names.series_instance_uid
        return self


@dataclass
class StowResult:
    """Everything a STOW-RS request did."""

    parts: list[PartOutcome] = field(default_factory=list)
    complete: bool = True
    """False when the body ended (or broke) before the closing boundary."""
    problem: str | None = None

    @property
    def stored(self) -> list[PartOutcome]:
        return [p for p in self.parts if p.stored]

    @property
    def failed(self) -> list[PartOutcome]:
        return [p for p in self.parts if not p.stored]


class _Part:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.field = bytearray()
        self.value = bytearray()
        self.path: Path | None = None
        self.fd: int | None = None
        self.size = 0
        self.refused: PartOutcome | None = None
        self.too_large = False
        self.transfer_syntax: str | None = None


class StowSession:
    """One STOW-RS request body. Feed it chunks with :meth:`feed`, then call :meth:`close`.

    Not thread-safe: the route feeds it from one thread at a time. Ingest happens inside
    :meth:`feed` (blocking: fsync and a database commit per instance), so the route runs it off
    the event loop.
    """

    def __init__(
        self,
        ingestor: Ingestor,
        spool: Spool,
        *,
        boundary: str,
        max_part_bytes: int,
        study_instance_uid: str | None = None,
        on_stored: Callable[[PartOutcome], None] | None = None,
    ) -> None:
        self.ingestor = ingestor
        self.spool = spool
        self.max_part_bytes = max_part_bytes
        self.study_instance_uid = study_instance_uid
        self.on_stored = on_stored
        self.result = StowResult()
        self._boundary = boundary.encode("latin-1")
        self._started = False
        self._pending = bytearray()
        self._ended = False
        self._broken = False
        self._part: _Part | None = None
        self._parser = MultipartParser(
            self._boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
            max_header_count=MAX_PART_HEADER_COUNT,
        )

    # -- feeding ----------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """Parse the next chunk of the body; completed parts are ingested now."""
        if self._broken or self._ended or not chunk:
            return
        if not self._started:
            chunk = self._skip_preamble(chunk)
            if not chunk:
                return
        try:
            self._parser.write(chunk)
        except MultipartParseError:
            self._break("the multipart body is malformed")

    def _skip_preamble(self, chunk: bytes) -> bytes:
        self._pending += chunk
        marker = b"--" + self._boundary
        index = self._pending.find(marker)
        while index > 0 and self._pending[index - 2 : index] != b"\r\n":
            index = self._pending.find(marker, index + 1)
        if index < 0:
            if len(self._pending) > MAX_PREAMBLE_BYTES:
                self._break("no multipart boundary found at the start of the body")
            return b""
        self._started = True
        data = bytes(self._pending[index:])
        self._pending = bytearray()
        return data

    def close(self) -> StowResult:
        """Finish the request: a part cut off by the end of the body is discarded."""
        if self._part is not None:
            self._discard_part(self._part)
            self._part = None
        if not self._ended:
            self.result.complete = False
            self.result.problem = self.result.problem or (
                "the body ended before the closing multipart boundary"
                if self._started
                else "no multipart boundary found in the body"
            )
        return self.result

    def _break(self, problem: str) -> None:
        self._broken = True
        self.result.complete = False
        self.result.problem = problem
        if self._part is not None:
            self._discard_part(self._part)
            self._part = None

    # -- parser callbacks -------------------------------------------------------------------

    def _on_part_begin(self) -> None:
        self._part = _Part()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        assert self._part is not None
        self._part.field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        assert self._part is not None
        self._part.value += data[start:end]

    def _on_header_end(self) -> None:
        part = self._part
        assert part is not None
        name = part.field.decode("latin-1").strip().lower()
        part.headers[name] = part.value.decode("latin-1").strip()
        part.field, part.value = bytearray(), bytearray()

    def _on_headers_finished(self) -> None:
        part = self._part
        assert part is not None
        # A part without Content-Type has the root type (RFC 2387), application/dicom here.
        media = parse_media_type(part.headers.get("content-type", DICOM))
        if media.type != DICOM:
            part.refused = PartOutcome(
                STATUS_CANNOT_UNDERSTAND, "body part is not application/dicom"
            )
            return
        part.transfer_syntax = media.params.get("transfer-syntax")
        part.path = self.spool.new_temp_path()
        try:
            part.fd = os.open(part.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            part.path = None
            part.refused = PartOutcome(STATUS_OUT_OF_RESOURCES, f"storage error: {exc.strerror}")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        assert part is not None
        before = part.size
        part.size += end - start
        if part.refused is not None or part.fd is None:
            return
        if part.size > self.max_part_bytes:
            # Write up to the cap (the header is in there, to name the instance), then no more.
            part.too_large = True
            end = start + max(0, self.max_part_bytes - before)
        view = memoryview(data)[start:end]
        try:
            while view:
                view = view[os.write(part.fd, view) :]
        except OSError as exc:
            os.close(part.fd)
            part.fd = None
            part.refused = PartOutcome(STATUS_OUT_OF_RESOURCES, f"storage error: {exc.strerror}")
            return
        if part.too_large:
            os.close(part.fd)
            part.fd = None

    def _on_part_end(self) -> None:
        part = self._part
        self._part = None
        assert part is not None
        if part.fd is not None:
            os.close(part.fd)
            part.fd = None
        outcome = self._finish_part(part)
        outcome.size = part.size
        self.result.parts.append(outcome)
        if outcome.stored and self.on_stored is not None:
            self.on_stored(outcome)

    def _on_end(self) -> None:
        self._ended = True

    # -- per part ---------------------------------------------------------------------------

    def _finish_part(self, part: _Part) -> PartOutcome:
        if part.refused is not None:
            if part.path is not None:
                self.spool.discard(part.path)
            return part.refused
        assert part.path is not None
        limit = self.ingestor.max_inflated
        if part.too_large:
            names = identify(part.path, limit)
            self.spool.discard(part.path)
            return PartOutcome(
                STATUS_OUT_OF_RESOURCES,
                f"instance exceeds the size cap of {self.max_part_bytes} bytes",
                too_large=True,
            ).named(names)
        try:
            path = ensure_part10(part.path, self.spool, part.transfer_syntax)
        except OSError as exc:
            self.spool.discard(part.path)
            return PartOutcome(STATUS_OUT_OF_RESOURCES, f"storage error: {exc.strerror}")
        names = identify(path, limit)
        try:
            check_part10(path, limit=limit, decoded_limit=self.ingestor.max_decoded)
        except StorageError as exc:
            self.spool.discard(path)
            return PartOutcome(exc.status, str(exc), over_decode_cap=True).named(names)
        except Exception:
            pass  # not understood: the ingest path refuses it with the precise C00x status
        result: IngestResult = self.ingestor.ingest_file(
            path,
            calling_ae_title=None,
            source="stow",
            expected_study_instance_uid=self.study_instance_uid,
        )
        return PartOutcome(
            result.status,
            result.reason,
            study_key=result.study_key,
            new_study=result.new_study,
            duplicate=result.duplicate,
        ).named(names)

    def _discard_part(self, part: _Part) -> None:
        if part.fd is not None:
            os.close(part.fd)
            part.fd = None
        if part.path is not None:
            self.spool.discard(part.path)


@dataclass(frozen=True)
class Names:
    """The UIDs naming an instance in the response (empty where unknown)."""

    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""


_NAME_KEYWORDS = {
    "sop_class_uid": "SOPClassUID",
    "sop_instance_uid": "SOPInstanceUID",
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
}
_NAME_TAGS = [0x00080016, 0x00080018, 0x0020000D, 0x0020000E]


def identify(path: Path, limit: int) -> Names:
    """Read the UIDs naming an instance (empty where unreadable or not a valid UID).

    Bounded like every read of a received part: at most ``limit`` bytes inflated or read.
    """
    try:
        ds = open_part10(path, limit=limit, specific_tags=_NAME_TAGS).dataset
    except Exception:
        return Names()
    found: dict[str, str] = {}
    for name, keyword in _NAME_KEYWORDS.items():
        try:
            value = str(ds.get(keyword, "") or "").rstrip("\x00 ")
        except Exception:
            continue
        if value and uid_problem(value) is None:
            found[name] = value
    return Names(**found)


# -- the response ---------------------------------------------------------------------------


def http_status(result: StowResult) -> int:
    """PS3.18 10.5.3: 200 all stored, 202 some stored, else 400/409/413/503 by the failures."""
    stored, failed = result.stored, result.failed
    if stored:
        return 200 if not failed and result.complete else 202
    if not failed:
        return 400  # nothing in the body: no parts, or a malformed body
    codes = {p.status for p in failed}
    if all(is_cannot_understand(c) for c in codes):
        return 400  # none could be understood
    if codes == {STATUS_OUT_OF_RESOURCES}:
        # 413 when every instance was over the size cap; 503 ("busy", retry later) when the
        # node is short of space; 409 when they inflate or decode beyond the cap (PS3.18
        # 10.5.3: stored none, and the same request will be refused again).
        if all(p.too_large for p in failed):
            return 413
        if any(not (p.too_large or p.over_decode_cap) for p in failed):
            return 503
    return 409


def response_dataset(
    result: StowResult,
    *,
    instance_url: Callable[[PartOutcome], str | None],
    study_url: str | None,
) -> Dataset:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-3)."""
    ds = Dataset()
    if study_url:
        ds.RetrieveURL = study_url
    ds.ReferencedSOPSequence = []
    ds.FailedSOPSequence = []
    for part in result.parts:
        item = Dataset()
        item.ReferencedSOPClassUID = part.sop_class_uid
        item.ReferencedSOPInstanceUID = part.sop_instance_uid
        if part.stored:
            url = instance_url(part)
            if url:
                item.RetrieveURL = url
            ds.ReferencedSOPSequence.append(item)
        else:
            item.FailureReason = part.status
            ds.FailedSOPSequence.append(item)
    if not ds.FailedSOPSequence:
        del ds.FailedSOPSequence
    return ds


def summary(result: StowResult) -> dict[str, Any]:
    """Patient-free counts for logs."""
    statuses: dict[str, int] = {}
    for part in result.failed:
        key = f"0x{part.status:04X}"
        statuses[key] = statuses.get(key, 0) + 1
    return {"stored": len(result.stored), "failed": len(result.failed), "statuses": statuses}
