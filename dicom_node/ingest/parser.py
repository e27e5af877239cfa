"""Reading a received Part 10 file for ingest: its UIDs, checked, and every bound enforced.

The header is read by :func:`dicom_node.dataset_io.read_header` (the one capped reader: deflate
and element-count bombs) and pixel bombs are refused by
:func:`dicom_node.dataset_io.check_pixel_data`, now rather than when a worker or a preview
decodes them. Every sequence item is parsed, bounded in nesting depth, so structural errors
surface at receive time; other values stay raw until used.

Refusals raise :class:`~dicom_node.errors.InvalidInstanceError` with a C000-family status
(cannot be parsed, C001 UID missing, C002 UID malformed) or A900 (disagrees with the command),
or :class:`~dicom_node.errors.StorageError` (A700: over a cap). Messages name attributes and
sizes, never values.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_node.dataset_io import (
    check_pixel_data,
    frame_count,
    inflated_size,
    read_header,
    read_meta,
)
from dicom_node.dimse_status import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_INVALID_UID,
    STATUS_MISSING_UID,
)
from dicom_node.errors import IngestError, InvalidInstanceError
from dicom_node.uids import uid_problem

LOGGER = logging.getLogger(__name__)

MAX_SEQUENCE_DEPTH = 64
"""Deeper sequence nesting is refused (DCMTK's limit); pydicom recurses once per level."""

_ZERO_PREAMBLE = bytes(128)
_UID_TAGS = (
    ("StudyInstanceUID", 0x0020000D),
    ("SeriesInstanceUID", 0x0020000E),
    ("SOPInstanceUID", 0x00080018),
    ("SOPClassUID", 0x00080016),
)


@dataclass(frozen=True)
class Parsed:
    """What a received file says it is: its UIDs, checked, and where its data set starts."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    number_of_frames: int | None
    header: Dataset = field(repr=False, compare=False)
    """The header as read (no pixel data), for :meth:`series_attributes`."""
    dataset_offset: int = 0

    def series_attributes(self) -> dict[str, Any]:
        """The series row's descriptive columns, read only when a series is first indexed
        (per instance, converting these values cost ~5 % of a receiver's CPU,
        ``benchmarks/profile_ingest.py``). A value that cannot be decoded is left out: it
        never refuses the instance, as its UIDs decide what it is."""
        try:
            return _series_attributes(self.header)
        except Exception as exc:
            LOGGER.warning(
                "series attributes cannot be decoded (%s); indexed without them",
                type(exc).__name__,
            )
            return {}

    def check_expected(
        self,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        study_instance_uid: str | None = None,
    ) -> None:
        """A900 when the data set disagrees with the DIMSE command (or the STOW-RS URL)."""
        if sop_class_uid is not None and self.sop_class_uid != sop_class_uid:
            raise InvalidInstanceError(
                "dataset SOP Class UID differs from the command's Affected SOP Class UID",
                STATUS_DATASET_MISMATCH,
            )
        if sop_instance_uid is not None and self.sop_instance_uid != sop_instance_uid:
            raise InvalidInstanceError(
                "dataset SOP Instance UID differs from the command's Affected SOP Instance UID",
                STATUS_DATASET_MISMATCH,
            )
        if study_instance_uid is not None and self.study_instance_uid != study_instance_uid:
            raise InvalidInstanceError(
                "instance belongs to a different study than the request URL",
                STATUS_DATASET_MISMATCH,
            )


def parse_part10(
    path: Path, *, max_inflated_bytes: int, max_decoded_bytes: int | None = None
) -> Parsed:
    """Parse and check a Part 10 file; zero its preamble in place.

    Raises :class:`InvalidInstanceError` with a C000-family status when the file cannot be
    understood and :class:`StorageError` when it cannot be read, inflates beyond
    ``max_inflated_bytes`` or declares pixel data decoding to more than ``max_decoded_bytes``
    (default: the same; :mod:`dicom_node.dataset_io`).
    """
    with path.open("r+b") as fh:
        preamble = fh.read(128)
        if fh.read(4) != b"DICM":
            raise InvalidInstanceError(
                "not a DICOM Part 10 file (no DICM prefix)", STATUS_CANNOT_UNDERSTAND
            )
        if preamble != _ZERO_PREAMBLE:
            # A preamble can carry an executable header (CVE-2019-11687).
            fh.seek(0)
            fh.write(_ZERO_PREAMBLE)
            fh.flush()
        return _parse(fh, max_inflated_bytes, max_decoded_bytes or max_inflated_bytes)


def parse_part10_bytes(
    data: bytes | bytearray, *, max_inflated_bytes: int, max_decoded_bytes: int | None = None
) -> Parsed:
    """:func:`parse_part10` for a file in memory (the caller writes a zeroed preamble)."""
    if bytes(data[128:132]) != b"DICM":
        raise InvalidInstanceError(
            "not a DICOM Part 10 file (no DICM prefix)", STATUS_CANNOT_UNDERSTAND
        )
    return _parse(io.BytesIO(data), max_inflated_bytes, max_decoded_bytes or max_inflated_bytes)


def dataset_sha256(source: Path | bytes | bytearray, offset: int) -> str:
    """SHA-256 of the data set alone (from ``offset``): the file meta and preamble are ours to
    rewrite, so two copies of an instance compare equal when their data sets do."""
    if not isinstance(source, Path):
        return hashlib.sha256(memoryview(source)[offset:]).hexdigest()
    h = hashlib.sha256()
    with source.open("rb") as fh:
        fh.seek(offset)
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _parse(fh: BinaryIO, max_inflated_bytes: int, max_decoded_bytes: int) -> Parsed:
    meta = read_meta(fh)
    tsuid = meta.transfer_syntax_uid
    if not tsuid or uid_problem(tsuid):
        raise InvalidInstanceError(
            "TransferSyntaxUID is missing or invalid", STATUS_CANNOT_UNDERSTAND
        )
    try:
        if tsuid == DeflatedExplicitVRLittleEndian:
            # The whole stream, counted and dropped as it inflates: a deflate bomb is refused
            # here even when its bulk sits in the pixel data the header read stops before.
            inflated_size(fh, meta.dataset_offset, max_inflated_bytes)
        header = read_header(fh, meta, limit=max_inflated_bytes)
        ds = header.dataset
        _walk(ds, 0)
        check_pixel_data(ds, header.stream, header.pixel_offset, tsuid, max_decoded_bytes)
    except IngestError:
        raise
    except RecursionError:
        raise InvalidInstanceError(
            "dataset nests sequences too deeply", STATUS_CANNOT_UNDERSTAND
        ) from None
    except Exception as exc:
        raise InvalidInstanceError(
            f"dataset cannot be parsed ({type(exc).__name__})", STATUS_CANNOT_UNDERSTAND
        ) from None

    uids: dict[str, str] = {}
    for keyword, tag in _UID_TAGS:
        try:
            elem = ds.get(tag)
            value = None if elem is None else elem.value
        except Exception:
            raise InvalidInstanceError(f"{keyword} cannot be decoded", STATUS_INVALID_UID) from None
        if value in (None, ""):
            raise InvalidInstanceError(f"{keyword} is missing", STATUS_MISSING_UID)
        value = str(value).rstrip("\x00 ")
        problem = uid_problem(value)
        if problem:
            raise InvalidInstanceError(f"{keyword} {problem}", STATUS_INVALID_UID)
        uids[keyword] = value

    # check_pixel_data refused an image's NumberOfFrames outside 1..MAX_FRAMES; elsewhere
    # (no Rows/Columns) a bad value is only left unrecorded.
    try:
        frames_elem = ds.get(0x00280008)
        present = frames_elem is not None and frames_elem.value not in (None, "")
        number_of_frames = frame_count(ds) if present else None
    except Exception:
        number_of_frames = None
    return Parsed(
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax_uid=tsuid,
        number_of_frames=number_of_frames,
        header=ds,
        dataset_offset=meta.dataset_offset,
    )


def _walk(ds: Dataset, depth: int) -> None:
    """Parse every sequence item, bounded in depth, so structural errors surface now.

    Other elements stay raw (converting ~100 values per instance cost 0.4 ms, a tenth of the
    per-instance budget); a bad value there fails the job that reads it, not the receive.
    """
    if depth > MAX_SEQUENCE_DEPTH:
        raise InvalidInstanceError(
            f"dataset nests sequences deeper than {MAX_SEQUENCE_DEPTH} levels",
            STATUS_CANNOT_UNDERSTAND,
        )
    for elem in ds.elements():
        vr = elem.VR
        if vr is None:  # implicit VR: from the dictionary, or SQ when of undefined length
            if getattr(elem, "length", 0) == 0xFFFFFFFF:
                vr = "SQ"
            else:
                try:
                    vr = dictionary_VR(elem.tag)
                except KeyError:
                    continue
        if vr == "SQ":
            for item in ds[elem.tag].value:
                _walk(item, depth + 1)


def _series_attributes(ds: Dataset) -> dict[str, Any]:
    def value(tag: int) -> Any:
        elem = ds.get(tag)  # by tag: skips the keyword lookup (per instance, it adds up)
        return None if elem is None else elem.value

    def text(tag: int, limit: int = 64) -> str | None:
        got = value(tag)
        if got in (None, ""):
            return None
        return str(got)[:limit]

    thickness: float | None
    try:
        raw = value(0x00180050)
        thickness = float(raw) if raw not in (None, "") else None
    except (TypeError, ValueError):
        thickness = None
    return {
        "modality": text(0x00080060, 16),
        "body_part": text(0x00180015),
        "series_description": text(0x0008103E),
        "study_description": text(0x00081030),
        "manufacturer": text(0x00080070),
        "slice_thickness": thickness,
    }
