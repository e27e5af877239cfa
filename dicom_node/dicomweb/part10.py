"""Making a STOW-RS body part a PS3.10 file before it reaches the ingest path.

PS3.18 asks for PS3.10 files in ``application/dicom`` parts, but some senders post a bare
dataset (no preamble, no ``DICM``, no group 0002) or a file without its preamble. Such a part is
given what it lacks; the dataset bytes themselves are never re-encoded. What still cannot be read
is left as it is, and the ingest path refuses it with a C000-family status.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.spool import Spool
from dicom_node.uids import uid_problem

_PREAMBLE = bytes(128)
_COPY_CHUNK = 1 << 20


def ensure_part10(path: Path, spool: Spool, transfer_syntax: str | None = None) -> Path:
    """Return the path of a PS3.10 file holding the part at ``path`` (which it may replace).

    ``transfer_syntax`` is the ``transfer-syntax`` parameter of the part's Content-Type, used
    for a bare dataset (whose encoding alone cannot tell, say, JPEG from Explicit VR Little
    Endian). When the part is not recognisable DICOM, ``path`` is returned unchanged.
    """
    with path.open("rb") as fh:
        head = fh.read(132)
    if head[128:132] == b"DICM":
        return path
    if head[:4] == b"DICM":
        # File meta without the preamble: prefix one.
        return _rewrite(path, spool, _PREAMBLE)
    meta = _meta_for_bare_dataset(path, transfer_syntax)
    if meta is None:
        return path
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return _rewrite(path, spool, _PREAMBLE + b"DICM" + buffer.getvalue())


def _meta_for_bare_dataset(path: Path, transfer_syntax: str | None) -> FileMetaDataset | None:
    try:
        ds = dcmread(
            path,
            force=True,
            stop_before_pixels=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID"],
        )
        sop_class = str(ds.get("SOPClassUID", "") or "")
        sop_instance = str(ds.get("SOPInstanceUID", "") or "")
        implicit, little = ds.original_encoding
    except Exception:
        return None
    if not sop_class or not sop_instance or uid_problem(sop_class) or uid_problem(sop_instance):
        return None  # the ingest path refuses it with the precise C00x status
    if transfer_syntax and not uid_problem(transfer_syntax):
        tsuid = transfer_syntax
    elif implicit is None:
        return None
    elif implicit:
        tsuid = str(ImplicitVRLittleEndian)
    else:
        tsuid = str(ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(tsuid)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _rewrite(path: Path, spool: Spool, prefix: bytes) -> Path:
    """Write ``prefix`` + the part's bytes to a new temporary file (which replaces the part)."""
    target = spool.new_temp_path()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        with os.fdopen(fd, "wb") as out, path.open("rb") as src:
            out.write(prefix)
            while chunk := src.read(_COPY_CHUNK):
                out.write(chunk)
    except BaseException:
        spool.discard(target)
        raise
    spool.discard(path)
    return target
