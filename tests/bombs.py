"""Hostile Part 10 files for the decode-bounds tests and the fuzzers: deflate bombs (a few MB
that inflate to GBs) and pixel bombs (a tiny compressed frame declaring a huge image).

Built byte by byte, independently of the node's reader.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

MIB = 1 << 20


def base_dataset(rows: int = 16, columns: int = 16, frames: int | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "BOMB"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    return ds


def part10(ds: Dataset, tsuid: str, body: bytes) -> bytes:
    """Preamble, file meta for ``ds`` in ``tsuid``, then ``body`` (the encoded data set)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(tsuid)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.10.1401.1")
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta)
    return bytes(128) + b"DICM" + buf.getvalue() + body


def encode(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def deflate_bomb(inflated_mib: int = 4095, *, in_pixels: bool = True) -> tuple[bytes, str]:
    """A Deflated Explicit VR LE file whose data set inflates to ``inflated_mib`` MiB of zeros
    (in the pixel data, or in a private OB element before it). Returns (bytes, SOP UID).

    Each MiB of zeros is one independent deflate block sequence ended by a full flush, so the
    same ~1 KB is repeated: ~4 MB of file for 4 GiB inflated, built in milliseconds.
    """
    ds = base_dataset(rows=1024, columns=1024)  # declares 2 MiB: only inflating tells
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    length = inflated_mib * MIB
    head = encode(ds)
    tag = (0x7FE0, 0x0010, b"OW") if in_pixels else (0x0009, 0x1010, b"OB")
    head += struct.pack("<HH2sHI", tag[0], tag[1], tag[2], 0, length)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(MIB)) + c.flush(zlib.Z_FULL_FLUSH)
    body = first + block * inflated_mib + c.flush(zlib.Z_FINISH)
    return part10(ds, DeflatedExplicitVRLittleEndian, body), str(ds.SOPInstanceUID)


def jpeg_frame(lines: int, samples: int) -> bytes:
    """A minimal baseline JPEG header (SOI, SOF0 for one 8-bit component, EOI)."""
    sof = struct.pack(">BHHB", 8, lines, samples, 1) + bytes([1, 0x11, 0])
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def encapsulated(fragments: list[bytes]) -> bytes:
    """Encapsulated Pixel Data (PS3.5 A.4): empty Basic Offset Table, one item per fragment."""
    out = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
    out += struct.pack("<HHI", 0xFFFE, 0xE000, 0)
    for frag in fragments:
        frag = frag + b"\x00" * (len(frag) % 2)
        out += struct.pack("<HHI", 0xFFFE, 0xE000, len(frag)) + frag
    return out + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def pixel_bomb(kind: str) -> tuple[bytes, str]:
    """A JPEG Baseline instance of a few hundred bytes that declares too much:

    * ``declared``: 65535 x 65535 x 30000 frames (~2.5e14 bytes) in the DICOM header;
    * ``frames``: NumberOfFrames 60000 (of 8 x 8) with a single fragment;
    * ``codestream``: a 512 x 512 header whose JPEG frame says 65000 x 65000.
    """
    if kind == "declared":
        ds = base_dataset(rows=65535, columns=65535, frames=30000)
        frags = [jpeg_frame(8, 8)]
    elif kind == "frames":
        ds = base_dataset(rows=8, columns=8, frames=60000)  # 3.8 MB declared: under the cap
        frags = [jpeg_frame(8, 8)]
    elif kind == "codestream":
        ds = base_dataset(rows=512, columns=512)
        frags = [jpeg_frame(65000, 65000)]
    else:
        raise ValueError(kind)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    return part10(ds, JPEGBaseline8Bit, encode(ds) + encapsulated(frags)), str(ds.SOPInstanceUID)


def good_instance() -> tuple[bytes, str]:
    """A small valid CT instance in Explicit VR Little Endian."""
    ds = base_dataset()
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.PixelData = bytes(16 * 16 * 2)
    return part10(ds, ExplicitVRLittleEndian, encode(ds)), str(ds.SOPInstanceUID)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
