"""WADO-RS (PS3.18 10.4) for spooled instances: the bytes as stored, and their metadata.

The node never transcodes: an instance is sent in the transfer syntax it was received in, when
the client accepts that one (``transfer-syntax=*`` accepts any); otherwise the route answers 406.
That is all a remote worker needs (``workers.source.DicomWebSource``) and what dicomweb-client
asks for with ``media_types=(("application/dicom", "*"),)``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from dicom_node.dataset_io import DEFAULT_MAX_DECODED_BYTES, open_part10
from dicom_node.spool import Spool
from dicom_node.state import Database, Instance, Series, Study

LOGGER = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
BULK_DATA_THRESHOLD = 1024 * 1024
"""Binary values up to this size are inlined in metadata (InlineBinary); larger ones are left
out (the node serves no bulk data resources). Pixel Data is never read for metadata."""


@dataclass(frozen=True)
class StoredInstance:
    """An indexed instance, as WADO-RS and QIDO-RS need it (no patient data)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    number_of_frames: int | None


def find_instances(
    db: Database,
    study_instance_uid: str,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    *,
    limit: int | None = None,
    offset: int = 0,
) -> list[StoredInstance]:
    """Indexed instances of a study (optionally one series or one instance), in arrival order."""
    query = (
        select(
            Study.study_instance_uid,
            Series.series_instance_uid,
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Instance.transfer_syntax_uid,
            Instance.path,
            Instance.size,
            Instance.number_of_frames,
        )
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Instance.study_id)
        .where(Study.study_instance_uid == study_instance_uid, Instance.purged_at.is_(None))
        .order_by(Series.id, Instance.id)
    )
    if series_instance_uid is not None:
        query = query.where(Series.series_instance_uid == series_instance_uid)
    if sop_instance_uid is not None:
        query = query.where(Instance.sop_instance_uid == sop_instance_uid)
    if offset:
        query = query.offset(offset)
    if limit is not None:
        query = query.limit(limit)
    with db.session() as s:
        return [StoredInstance(*row) for row in s.execute(query).all()]


def new_boundary() -> str:
    return uuid.uuid4().hex


def multipart_content_type(boundary: str) -> str:
    return f'multipart/related; type="application/dicom"; boundary={boundary}'


def multipart_body(spool: Spool, instances: list[StoredInstance], boundary: str) -> Iterator[bytes]:
    """The ``multipart/related`` body: one ``application/dicom`` part per instance, streamed
    from the spool file in chunks (memory stays bounded for any study size)."""
    delimiter = f"--{boundary}\r\n".encode("ascii")
    for item in instances:
        try:
            fh = spool.path(item.path).open("rb")
        except OSError:
            # Removed since the query (a retention sweep): the others are still worth sending.
            LOGGER.warning("WADO-RS: a spooled instance file is missing; it is left out")
            continue
        with fh:
            yield delimiter
            yield (
                f"Content-Type: application/dicom; transfer-syntax={item.transfer_syntax_uid}\r\n"
                f"Content-Length: {item.size}\r\n\r\n"
            ).encode("ascii")
            while chunk := fh.read(READ_CHUNK):
                yield chunk
            yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def instance_metadata(
    spool: Spool, item: StoredInstance, *, limit: int = DEFAULT_MAX_DECODED_BYTES
) -> dict[str, Any] | None:
    """The DICOM JSON model of one instance's header (PS3.18 F.2), or None when unreadable.

    Read through :func:`dicom_node.dataset_io.open_part10`: a Deflated instance is inflated as
    a stream up to its pixel data, never past ``limit`` bytes.
    """
    try:
        ds = open_part10(spool.path(item.path), limit=limit).dataset
    except Exception as exc:
        LOGGER.warning(
            "WADO-RS metadata: a spooled instance cannot be read (%s)", type(exc).__name__
        )
        return None

    def leave_out(_element: Any) -> str:
        return ""

    try:
        data = ds.to_json_dict(
            bulk_data_threshold=BULK_DATA_THRESHOLD, bulk_data_element_handler=leave_out
        )
    except Exception as exc:
        # A value pydicom cannot convert (unknown VR, odd byte count: found by
        # tests/test_fuzz_part10.py). Only the exception type is logged: its text holds values.
        LOGGER.warning(
            "WADO-RS metadata: a spooled instance has undecodable values (%s)", type(exc).__name__
        )
        return None
    data = _drop_bulk(data)
    data["00020010"] = {"vr": "UI", "Value": [item.transfer_syntax_uid]}
    return data


def _drop_bulk(data: dict[str, Any]) -> dict[str, Any]:
    """Remove elements over the bulk data threshold (they came back with an empty
    BulkDataURI) instead of pointing at a resource that does not exist, in items too."""
    out: dict[str, Any] = {}
    for tag, element in data.items():
        if element.get("BulkDataURI", None) == "":
            continue
        if element.get("vr") == "SQ" and element.get("Value"):
            element = {**element, "Value": [_drop_bulk(item) for item in element["Value"]]}
        out[tag] = element
    return out
