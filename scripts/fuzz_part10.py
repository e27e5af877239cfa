#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris) of the Part 10 parsing every received instance goes through.

One input is one Part 10 file (as C-STORE or STOW-RS delivers it). It is given to

1. :func:`dicom_node.ingest.parse_part10_bytes`, the ingest path's parser: it must either
   return the instance's UIDs or raise the node's :class:`~dicom_node.errors.IngestError`
   (which the receiver turns into a DIMSE status). Any other exception is a finding;
2. :func:`dicom_node.dataset_io.open_part10` and :func:`~dicom_node.dataset_io.check_pixels`,
   the capped open used by STOW-RS, WADO-RS metadata, previews and the worker. Their callers
   classify pydicom's exceptions, so an ``Exception`` there is not a finding.

Both run with an 8 MiB inflate/decode cap. Findings are also: an input that takes longer than
``--timeout`` seconds, memory over ``--rss-limit-mb`` (a deflate or pixel bomb getting through),
or a ``BaseException`` that is not an ``Exception``.

Usage::

    .venv/bin/python scripts/fuzz_part10.py --seconds 60          # needs the dev extra (atheris)
    .venv/bin/python scripts/fuzz_part10.py --runs 10000 --work /tmp/part10-corpus

Seeds: ``tests/fuzz_corpus/part10``; the options are :mod:`atheris_runner`'s.
"""

from __future__ import annotations

import contextlib
import io
import zlib
from pathlib import Path

import atheris
from atheris_runner import run

with atheris.instrument_imports(include=["pydicom", "dicom_node"]):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.sequence import Sequence
    from pydicom.uid import UID

    from dicom_node.dataset_io import check_pixels, open_part10
    from dicom_node.errors import IngestError
    from dicom_node.ingest import parse_part10_bytes

REPO = Path(__file__).resolve().parent.parent
SEEDS = REPO / "tests" / "fuzz_corpus" / "part10"
CAP = 1 << 20
"""Small, so that one input's parse stays well within ``--timeout`` under instrumentation."""


def one_input(data: bytes) -> None:
    """The fuzz target: one received Part 10 file."""
    with contextlib.suppress(IngestError):  # refused with a DIMSE status: the contract
        parse_part10_bytes(data, max_inflated_bytes=CAP)
    try:
        opened = open_part10(data, limit=CAP)
        check_pixels(opened, data, CAP)
    except Exception:
        return  # classified by the callers (placeholder, None, job failure, C000)


# -- seeds -----------------------------------------------------------------------------------


def _dataset(rows: int = 8, columns: int = 8, frames: int | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1401.9.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1401.9.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1401.9.3"
    ds.Modality = "CT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    if frames is not None:
        ds.NumberOfFrames = frames
    return ds


def _encode(ds: Dataset, *, implicit: bool = False, little: bool = True) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = little, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def _part10(ds: Dataset, tsuid: str, body: bytes) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(tsuid)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.10.1401.1")
    buf = io.BytesIO()
    write_file_meta_info(buf, meta)  # type: ignore[arg-type]
    return bytes(128) + b"DICM" + buf.getvalue() + body


def _encapsulated(fragments: list[bytes]) -> bytes:
    import struct

    out = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
    out += struct.pack("<HHI", 0xFFFE, 0xE000, 0)
    for frag in fragments:
        frag += b"\x00" * (len(frag) % 2)
        out += struct.pack("<HHI", 0xFFFE, 0xE000, len(frag)) + frag
    return out + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def seeds() -> dict[str, bytes]:
    """A handful of small, valid files in the syntaxes and shapes the node receives."""
    native = _dataset()
    native.PixelData = bytes(8 * 8 * 2)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = c.compress(_encode(native)) + c.flush()
    jpeg = _dataset(frames=2)
    jpeg.BitsAllocated, jpeg.BitsStored, jpeg.HighBit = 8, 8, 7
    sof = b"\xff\xc0\x00\x0b\x08\x00\x08\x00\x08\x01\x01\x11\x00"
    jpeg_body = _encode(jpeg) + _encapsulated([b"\xff\xd8" + sof + b"\xff\xd9"] * 2)
    enhanced = _dataset(frames=2)
    group = Dataset()
    position = Dataset()
    position.ImagePositionPatient = [0, 0, 1]
    group.PlanePositionSequence = Sequence([position])
    enhanced.PerFrameFunctionalGroupsSequence = Sequence([group, group])
    enhanced.PixelData = bytes(8 * 8 * 2 * 2)
    # 16 MiB of zeros in the pixel data (twice the cap) in ~16 KB: one full-flushed block per MiB.
    head = _encode(_dataset(rows=2048, columns=4096)) + bytes.fromhex("e07f10004f57000000000001")
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    bomb += (c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)) * 16 + c.flush()
    return {
        "deflate-bomb-16MiB": _part10(native, "1.2.840.10008.1.2.1.99", bomb),
        "explicit-le": _part10(native, "1.2.840.10008.1.2.1", _encode(native)),
        "implicit-le": _part10(native, "1.2.840.10008.1.2", _encode(native, implicit=True)),
        "big-endian": _part10(native, "1.2.840.10008.1.2.2", _encode(native, little=False)),
        "deflated": _part10(native, "1.2.840.10008.1.2.1.99", deflated),
        "jpeg-2-frames": _part10(jpeg, "1.2.840.10008.1.2.4.50", jpeg_body),
        "enhanced-sequences": _part10(enhanced, "1.2.840.10008.1.2.1", _encode(enhanced)),
    }


def main() -> None:
    run(
        "fuzz_part10",
        __doc__,
        seed_folder=SEEDS,
        one_input=one_input,
        seeds=seeds,
        seed_suffix=".dcm",
        rss_limit_mb=512,
        max_len=65536,
        quiet_loggers=("pydicom", "dicom_node"),
    )


if __name__ == "__main__":
    main()
