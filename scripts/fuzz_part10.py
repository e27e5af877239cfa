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

The seed corpus lives in ``tests/fuzz_corpus/part10`` (written by ``--write-seeds``); inputs the
fuzzer finds interesting go to ``--work`` (a temporary folder unless given), crash inputs to
``--artifacts``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import atheris

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


def write_seeds(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (folder / f"{name}.dcm").write_bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="stop after this long (default 60)")
    parser.add_argument("--runs", type=int, default=-1, help="stop after this many inputs")
    parser.add_argument("--work", type=Path, help="where new interesting inputs go (default: temp)")
    parser.add_argument(
        "--artifacts", type=Path, default=Path(tempfile.gettempdir()) / "fuzz_part10"
    )
    parser.add_argument("--timeout", type=int, default=5, help="seconds one input may take")
    parser.add_argument("--rss-limit-mb", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=65536, help="largest input (bytes)")
    parser.add_argument("--write-seeds", action="store_true", help=f"(re)write {SEEDS} and exit")
    args = parser.parse_args()
    if args.write_seeds:
        write_seeds(SEEDS)
        return
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    logging.getLogger("dicom_node").setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")  # pydicom warns on every invalid value the mutator makes
    work = args.work or Path(tempfile.mkdtemp(prefix="fuzz_part10_corpus_"))
    work.mkdir(parents=True, exist_ok=True)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    libfuzzer = [
        sys.argv[0],
        str(work),
        str(SEEDS),
        f"-max_total_time={args.seconds}",
        f"-runs={args.runs}",
        f"-timeout={args.timeout}",
        f"-rss_limit_mb={args.rss_limit_mb}",
        f"-max_len={args.max_len}",
        f"-artifact_prefix={args.artifacts}/",
        "-print_final_stats=1",
    ]
    print(f"corpus: {work} (seeds {SEEDS}); crash artifacts: {args.artifacts}", flush=True)
    atheris.Setup(libfuzzer, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
