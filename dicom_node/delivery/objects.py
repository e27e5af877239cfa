"""The stored result files a delivery sends, and the attributes that mark them as ours.

Results are written to the results directory before any delivery, so each send (and resend)
reads the same bytes. Only the header is parsed here, never the pixel data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.errors import PermanentDeliveryError

IDENTITY_KEYWORDS: tuple[str, ...] = (
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "SeriesDescription",
    "SeriesNumber",
    "InstanceNumber",
    "ContentDate",
    "ContentTime",
    "ContentCreatorName",
)
"""Top-level attributes that tell our output apart from someone else's object with the same SOP
Instance UID: the node writes its name and version, an "AI: ..." series description and the
job's content date/time into every SR and SEG. The check uses the ones present in our file."""

UID_KEYWORDS: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)

_HEADER_TAGS = [*UID_KEYWORDS, *IDENTITY_KEYWORDS]


def normalise(value: Any) -> str:
    """A comparable text form of an attribute value, as read from a file, JSON or C-FIND.

    Multi-valued elements are joined with a backslash; surrounding spaces (DICOM padding) are
    dropped; a time's fractional seconds lose trailing zeros, since peers re-format them.
    """
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(normalise(v) for v in value)
    text = str(value).strip()
    if "." in text and text.replace(".", "", 1).isdigit():
        head, _, frac = text.partition(".")
        frac = frac.rstrip("0")
        text = f"{head}.{frac}" if frac else head
    return text


def identity_of(ds: Dataset) -> dict[str, str]:
    """The identifying attributes (UIDs and :data:`IDENTITY_KEYWORDS`) that ``ds`` has, non-empty."""
    out: dict[str, str] = {}
    for keyword in (*UID_KEYWORDS, *IDENTITY_KEYWORDS):
        if keyword in ds:
            value = normalise(ds.get(keyword))
            if value:
                out[keyword] = value
    return out


def identity_from_json(item: Mapping[str, Any]) -> dict[str, str]:
    """Like :func:`identity_of`, for one DICOM JSON object (QIDO-RS or WADO-RS metadata)."""
    from pydicom.datadict import tag_for_keyword

    wanted = {}
    for keyword in (*UID_KEYWORDS, *IDENTITY_KEYWORDS):
        tag = tag_for_keyword(keyword)
        key = f"{tag:08X}" if tag is not None else None
        if key and key in item:
            wanted[key] = item[key]
    return identity_of(Dataset.from_json(wanted))


@dataclass(frozen=True)
class StoredObject:
    """One result file to deliver."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    identity: Mapping[str, str]
    """Our values of the identifying attributes (see :func:`identity_of`)."""
    size: int

    @property
    def label(self) -> str:
        """How messages name this object: its file name (results are named by opaque keys)."""
        return self.path.name


def load_objects(paths: Iterable[Path]) -> list[StoredObject]:
    """Read the headers of the result files, raising ``PermanentDeliveryError`` for a file that is
    missing, not DICOM Part 10, or lacks its UIDs (a resend could never fix those)."""
    objects = []
    for path in paths:
        path = Path(path)
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            meta = ds.file_meta
            sop_class = str(meta.MediaStorageSOPClassUID)
            sop_uid = str(meta.MediaStorageSOPInstanceUID)
            syntax = str(meta.TransferSyntaxUID)
        except FileNotFoundError:
            raise PermanentDeliveryError(f"result file {path.name} does not exist") from None
        except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            raise PermanentDeliveryError(
                f"result file {path.name} is not a readable DICOM Part 10 file ({type(exc).__name__})"
            ) from None
        identity = identity_of(ds)
        missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID") if k not in identity]
        if missing:
            raise PermanentDeliveryError(f"result file {path.name} lacks {', '.join(missing)}")
        objects.append(
            StoredObject(
                path=path,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_uid,
                transfer_syntax_uid=syntax,
                study_instance_uid=identity["StudyInstanceUID"],
                series_instance_uid=identity["SeriesInstanceUID"],
                identity={k: v for k, v in identity.items() if k in IDENTITY_KEYWORDS},
                size=path.stat().st_size,
            )
        )
    return objects


def ownership_problem(ours: StoredObject, theirs: Mapping[str, str]) -> str | None:
    """Why the object a peer holds under our SOP Instance UID is *not* ours, or ``None`` if it is.

    ``theirs`` is :func:`identity_of` / :func:`identity_from_json` of the peer's copy. Every
    attribute both sides have must be equal; at least one of our identifying attributes must be
    returned by the peer, otherwise ownership cannot be confirmed. The reason names attributes,
    never their values (they may be anything).
    """
    expected = {
        "SOPInstanceUID": ours.sop_instance_uid,
        "SOPClassUID": ours.sop_class_uid,
        "StudyInstanceUID": ours.study_instance_uid,
        "SeriesInstanceUID": ours.series_instance_uid,
        **ours.identity,
    }
    differ = [k for k, v in expected.items() if k in theirs and theirs[k] != v]
    if differ:
        return f"a different object with the same SOP Instance UID is stored there (differs in {', '.join(differ)})"
    compared = [k for k in ours.identity if k in theirs]
    if not compared:
        return (
            "the peer returned none of our identifying attributes, so ownership cannot be confirmed"
        )
    return None
