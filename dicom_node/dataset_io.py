"""Opening Part 10 data within bounds: the one place that inflates and sizes pixel data.

Every reader of received instances (C-STORE ingest, STOW-RS, WADO-RS metadata, previews and
the worker's volume loader) opens them here, because two things in an instance can make a
small input cost a lot of memory:

* **Deflated Explicit VR Little Endian** (PS3.5 A.5): pydicom inflates the whole data set with
  one ``zlib.decompress`` call, so ~10 MB of deflated zeros becomes ~10 GB in RAM. Here the data
  set is inflated as a stream (:class:`InflatingReader`: ``zlib.decompressobj`` with a
  ``max_length`` per call), read by pydicom as it goes, and refused the moment the inflated
  size passes the cap; nothing beyond the cap is ever held.
* **Pixel bombs**: a small compressed frame that declares a huge image. Before pixel data is
  decoded, :func:`check_pixels` checks the declared decoded size
  (Rows x Columns x SamplesPerPixel x BitsAllocated/8 x NumberOfFrames) against the cap, that
  NumberOfFrames is sane and no more than the encapsulated fragments (PS3.5 A.4: every frame
  starts a fragment), and that each frame's JPEG / JPEG-LS / JPEG 2000 codestream header
  declares no larger image than Rows x Columns (decoders allocate what the codestream says).

The cap is ``scp.max_decoded_bytes``. Refusals raise :class:`~dicom_node.errors.StorageError`
(over the cap, A700) or :class:`~dicom_node.errors.InvalidInstanceError` (inconsistent or
corrupt, C000); messages carry sizes only, never dataset values.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.dimse_status import STATUS_CANNOT_UNDERSTAND
from dicom_node.errors import InvalidInstanceError, StorageError

DEFAULT_MAX_DECODED_BYTES = 1024**3
"""The default of ``scp.max_decoded_bytes``, for readers not handed the settings."""

MAX_FRAMES = 65_535
"""More frames than any CT, MR, US cine or tomosynthesis instance has (a 1000-frame enhanced CT
is large); beyond it NumberOfFrames is refused, so no per-frame loop runs unbounded."""

MAX_ELEMENTS = 300_000
"""Most element headers one read may parse. Bytes alone do not bound the cost: ~1 MB of
deflate makes 1 GiB of 8-byte empty elements, minutes of parsing (~10 us each) and ~200 bytes
of memory each (found by scripts/fuzz_part10.py). A 1000-frame enhanced CT's functional
groups or a large RT structure set have some 30,000-150,000."""

INFLATE_CHUNK = 1 << 20
"""Most bytes one ``decompress`` call may return (its ``max_length``)."""

REWIND_WINDOW = 1 << 20
"""Inflated bytes kept behind the read position: pydicom seeks back a few bytes at a time."""

PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_ENCODINGS = {  # transfer syntax -> (implicit VR, little endian); all others explicit LE
    str(ImplicitVRLittleEndian): (True, True),
    str(ExplicitVRBigEndian): (False, False),
}
_META_LONG_VRS = frozenset(  # explicit VRs with a 4-byte length (PS3.5 7.1.2)
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_CODESTREAM_HEAD = 64 * 1024
"""Bytes of a fragment read to find its codestream header (past APPn segments)."""


# -- streaming, capped inflate ------------------------------------------------------------------


class InflatingReader(io.RawIOBase):
    """A read-only file over a raw-deflate stream, inflated as it is read, capped at ``limit``.

    Seeks forward inflate and discard; seeks back are allowed within :data:`REWIND_WINDOW`
    (all pydicom needs). Memory stays at about the window plus the largest single read, and a
    read never goes past ``limit`` inflated bytes: :class:`StorageError` is raised instead.
    """

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        super().__init__()
        self._raw = raw
        self._limit = limit
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._buf_start = 0  # absolute offset of _buf[0]
        self._pos = 0
        self._eof = False

    @property
    def inflated(self) -> int:
        """Bytes inflated so far."""
        return self._buf_start + len(self._buf)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._pos
        elif whence == os.SEEK_END:
            self._fill(self._limit + 1)
            offset += self.inflated
        elif whence != os.SEEK_SET:
            raise ValueError(f"invalid whence {whence}")
        if offset < self._buf_start:
            raise OSError("cannot seek this far back in an inflated stream")
        self._fill(offset, keep=False)
        self._pos = offset
        return offset

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self._limit + 1 - self._pos
        if size <= 0:
            return b""
        start = self._pos - self._buf_start
        if start + size > len(self._buf):  # most reads are served from what is inflated
            self._fill(self._pos + size)
            start = self._pos - self._buf_start
        out = bytes(self._buf[start : start + size])
        self._pos += len(out)
        self._trim()
        return out

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> int:
        """Inflate the rest (discarding it) and return the total inflated size."""
        self._fill(self._limit + 1, keep=False)
        return self.inflated

    def _trim(self) -> None:
        behind = self._pos - self._buf_start - REWIND_WINDOW
        if behind > INFLATE_CHUNK:  # in steps, not per read
            del self._buf[:behind]
            self._buf_start += behind

    def _fill(self, target: int, *, keep: bool = True) -> None:
        """Inflate until ``target`` bytes exist (or the stream ends); past ``limit``, refuse."""
        target = min(target, self._limit + 1)
        while self.inflated < target and not self._eof:
            # Ahead by 64 KiB at least (small reads would each cost a decompress call), never
            # past the cap.
            want = min(INFLATE_CHUNK, max(target - self.inflated, 1 << 16))
            want = min(want, self._limit + 1 - self.inflated)
            try:
                if self._inflater.eof:  # bytes after the end of the stream are ignored
                    data, self._eof = b"", True
                elif self._inflater.unconsumed_tail:
                    data = self._inflater.decompress(self._inflater.unconsumed_tail, want)
                else:
                    raw = self._raw.read(INFLATE_CHUNK)
                    if not raw:
                        data, self._eof = self._inflater.flush(), True
                    else:
                        data = self._inflater.decompress(raw, want)
            except zlib.error:
                raise InvalidInstanceError(
                    "deflated data set is corrupt", STATUS_CANNOT_UNDERSTAND
                ) from None
            self._buf += data
            if not keep:
                # Skipping forward: keep only the window behind the target.
                cut = min(target - REWIND_WINDOW - self._buf_start, len(self._buf))
                if cut > 0:
                    del self._buf[:cut]
                    self._buf_start += cut
            if self.inflated > self._limit:
                raise StorageError(
                    f"deflated data set inflates beyond the cap of {self._limit} bytes"
                )


class CountedReads:
    """A file wrapper that refuses to go on past :data:`MAX_ELEMENTS` element headers.

    pydicom reads each element's tag, VR and length with one ``read(8)`` (items and 8-byte
    values count too, so this is an upper bound on elements), hence counting those reads.
    """

    def __init__(self, fh: Any, budget: int = MAX_ELEMENTS) -> None:
        self._fh = fh
        self._left = budget
        self.seek = fh.seek
        self.tell = fh.tell

    def read(self, size: int = -1) -> bytes:
        if size == 8:
            self._left -= 1
            if self._left < 0:
                raise StorageError(f"data set has more than {MAX_ELEMENTS} elements")
        data: bytes = self._fh.read(size)
        return data


def inflated_size(fh: BinaryIO, offset: int, limit: int) -> int:
    """Inflate the raw-deflate stream at ``offset`` without keeping it; refuse past ``limit``."""
    fh.seek(offset)
    return InflatingReader(fh, limit).drain()


# -- opening ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Meta:
    """Where the data set starts (after group 0002) and its Transfer Syntax UID."""

    dataset_offset: int
    transfer_syntax_uid: str


def read_meta(fh: BinaryIO) -> Meta:
    """Walk the file meta elements (always Explicit VR Little Endian, PS3.10 7.1) by hand.

    ``fh`` is at the start of a Part 10 file (preamble). Bounded: one short read per element.
    """
    fh.seek(128)
    if fh.read(4) != b"DICM":
        raise InvalidInstanceError(
            "not a DICOM Part 10 file (no DICM prefix)", STATUS_CANNOT_UNDERSTAND
        )
    pos = 132
    tsuid = ""
    while True:
        fh.seek(pos)
        header = fh.read(8)
        if len(header) < 8:
            return Meta(pos, tsuid)
        group, element = struct.unpack("<HH", header[:4])
        if group != 0x0002:
            return Meta(pos, tsuid)
        vr = header[4:6]
        if vr in _META_LONG_VRS:
            extra = fh.read(4)
            if len(extra) < 4:
                raise InvalidInstanceError(
                    "file meta information is truncated", STATUS_CANNOT_UNDERSTAND
                )
            length = struct.unpack("<I", extra)[0]
            start = pos + 12
        else:
            length = struct.unpack("<H", header[6:8])[0]
            start = pos + 8
        if element == 0x0010:
            fh.seek(start)
            tsuid = fh.read(min(length, 64)).decode("ascii", "replace").rstrip("\x00 ")
        pos = start + length


def _stop_at_pixels(limit: int) -> Callable[[BaseTag, str | None, int], bool]:
    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag in PIXEL_TAGS:
            return True
        if length != UNDEFINED_LENGTH and length > limit:
            raise StorageError(f"an element declares {length} bytes, over the cap of {limit}")
        return False

    return stop


def _refuse_huge(limit: int) -> Callable[[BaseTag, str | None, int], bool]:
    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        if length != UNDEFINED_LENGTH and length > limit:
            raise StorageError(f"an element declares {length} bytes, over the cap of {limit}")
        return False

    return stop


def _dataset_stream(fh: BinaryIO, meta: Meta, limit: int) -> tuple[Any, bool, bool]:
    """The data set of ``fh`` as a bounded stream, with its (implicit VR, little endian).

    Deflated is read through the capped streaming inflater (never pydicom's whole-buffer
    ``zlib.decompress``); every stream counts element headers (:class:`CountedReads`).
    """
    fh.seek(meta.dataset_offset)
    if meta.transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        return CountedReads(InflatingReader(fh, limit)), False, True
    implicit, little = _ENCODINGS.get(meta.transfer_syntax_uid, (False, True))
    return CountedReads(fh), implicit, little


def _pixel_offset(stream: Any) -> int | None:
    """Where the element the read stopped at starts (None: the data set ended)."""
    at: int = stream.tell()
    return at if stream.read(4) else None


@dataclass
class Header:
    """The data set up to its pixel data, as :func:`read_header` reads it."""

    dataset: Dataset
    """Values left raw until used; no file meta."""
    pixel_offset: int | None
    """Where the pixel data element starts in :attr:`stream` (None: no pixel data)."""
    stream: Any
    """The stream :attr:`pixel_offset` is in: the file, or the inflated data set (Deflated)."""


def read_header(fh: BinaryIO, meta: Meta, *, limit: int) -> Header:
    """The data set of an open Part 10 file up to its pixel data.

    The receive path's reader: ``meta`` comes from :func:`read_meta` on the same file, so the
    file meta is not parsed a second time and no :class:`FileDataset` is built (reading from
    the known offset is 2.5x faster than ``dcmread``). Bounded like :func:`open_part10` -- a
    Deflated data set inflated as a stream and refused past ``limit``, at most
    :data:`MAX_ELEMENTS` elements -- except that element lengths are not capped: the received
    file (or the capped inflater) already bounds what one read can return.
    """
    stream, implicit, little = _dataset_stream(fh, meta, limit)
    ds = read_dataset(stream, implicit, little, stop_when=_at_pixel_data)
    return Header(ds, _pixel_offset(stream), stream)


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag in PIXEL_TAGS


@dataclass
class Opened:
    """A data set read by :func:`open_part10`, with where its pixel data element starts."""

    dataset: FileDataset
    meta: Meta
    pixel_offset: int | None
    """Offset of the pixel data element in the (inflated) data set stream; None when absent
    or when the pixel data was read."""


def open_part10(
    source: Path | str | bytes | bytearray | memoryview | BinaryIO,
    *,
    limit: int,
    stop_before_pixels: bool = True,
    specific_tags: list[int] | None = None,
) -> Opened:
    """Read a Part 10 file (path, bytes or binary file) within ``limit`` inflated/read bytes.

    Deflated data sets are inflated as a stream and refused past ``limit``
    (:class:`StorageError`); no element longer than ``limit`` is read. With
    ``stop_before_pixels`` the pixel data is not read; with ``specific_tags`` only those
    elements are kept (the rest is skipped, or inflated and dropped). Parse failures other than
    the node's own errors propagate as pydicom/Python exceptions for the caller to classify.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        return _open(io.BytesIO(source), None, limit, stop_before_pixels, specific_tags)
    if isinstance(source, Path | str):
        with open(source, "rb") as fh:
            return _open(fh, os.fspath(source), limit, stop_before_pixels, specific_tags)
    return _open(source, None, limit, stop_before_pixels, specific_tags)


def _open(
    fh: BinaryIO,
    name: str | None,
    limit: int,
    stop_before_pixels: bool,
    specific_tags: list[int] | None = None,
) -> Opened:
    meta = read_meta(fh)
    fh.seek(132)
    file_meta = FileMetaDataset(
        read_dataset(fh, False, True, stop_when=lambda tag, vr, length: tag.group != 0x0002)
    )
    if meta.transfer_syntax_uid:
        file_meta.TransferSyntaxUID = UID(meta.transfer_syntax_uid)
    stream, implicit, little = _dataset_stream(fh, meta, limit)
    stop = _stop_at_pixels(limit) if stop_before_pixels else _refuse_huge(limit)
    ds = read_dataset(stream, implicit, little, stop_when=stop, specific_tags=specific_tags)
    # In the file for plain syntaxes; in the inflated stream for Deflated (native only).
    pixel_offset = _pixel_offset(stream) if stop_before_pixels else None
    out = FileDataset(name or "", ds, preamble=None, file_meta=file_meta)
    out.set_original_encoding(implicit, little, ds._character_set)
    if name is None:
        out.filename = None
    return Opened(out, meta, pixel_offset)


# -- pixel bounds -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelShape:
    """The decoded size an instance declares."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int

    @property
    def frame_bytes(self) -> int:
        return (self.rows * self.columns * self.samples * self.bits_allocated + 7) // 8

    @property
    def decoded_bytes(self) -> int:
        return self.frame_bytes * self.frames


def _int(ds: Dataset, tag: int, default: int | None) -> int | None:
    try:
        elem = ds.get(tag)
        value = None if elem is None else elem.value
        if value in (None, ""):
            return default
        return int(value)
    except Exception:
        raise InvalidInstanceError(
            "an image pixel attribute cannot be decoded", STATUS_CANNOT_UNDERSTAND
        ) from None


def frame_count(ds: Dataset) -> int:
    """NumberOfFrames (1 when absent), refused when not within 1..:data:`MAX_FRAMES`."""
    frames = _int(ds, 0x00280008, 1)
    assert frames is not None
    if not 1 <= frames <= MAX_FRAMES:
        raise InvalidInstanceError(
            f"NumberOfFrames must be within 1..{MAX_FRAMES}", STATUS_CANNOT_UNDERSTAND
        )
    return frames


def pixel_shape(ds: Dataset) -> PixelShape | None:
    """The declared image size, or None when the data set has no image pixel attributes."""
    rows, columns = _int(ds, 0x00280010, None), _int(ds, 0x00280011, None)
    if rows is None and columns is None:
        return None
    bits = _int(ds, 0x00280100, 16)
    samples = _int(ds, 0x00280002, 1)
    assert bits is not None and samples is not None
    if not (rows and columns and 0 < rows <= 0xFFFF and 0 < columns <= 0xFFFF):
        raise InvalidInstanceError("Rows/Columns must be within 1..65535", STATUS_CANNOT_UNDERSTAND)
    if samples not in (1, 3, 4) or not (bits == 1 or (bits % 8 == 0 and 8 <= bits <= 64)):
        raise InvalidInstanceError(
            "SamplesPerPixel or BitsAllocated has an unsupported value", STATUS_CANNOT_UNDERSTAND
        )
    return PixelShape(rows, columns, samples, bits, frame_count(ds))


def check_declared_size(ds: Dataset, limit: int) -> PixelShape | None:
    """Refuse (:class:`StorageError`) an image whose declared decoded size exceeds ``limit``."""
    shape = pixel_shape(ds)
    if shape is not None and shape.decoded_bytes > limit:
        raise StorageError(
            f"declared pixel data of {shape.decoded_bytes} bytes ({shape.frames} frame(s) of "
            f"{shape.rows}x{shape.columns}) exceeds the decode cap of {limit} bytes"
        )
    return shape


def check_pixels(opened: Opened, source: Any, limit: int) -> PixelShape | None:
    """Everything checked before pixel data is decoded (see the module docstring).

    ``opened`` comes from :func:`open_part10` with ``stop_before_pixels``; ``source`` is what
    it was opened from (path, bytes or a seekable file), read again for the fragments.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        return check_pixel_data(
            opened.dataset,
            io.BytesIO(source),
            opened.pixel_offset,
            opened.meta.transfer_syntax_uid,
            limit,
        )
    if isinstance(source, Path | str):
        with open(source, "rb") as fh:
            return check_pixel_data(
                opened.dataset, fh, opened.pixel_offset, opened.meta.transfer_syntax_uid, limit
            )
    return check_pixel_data(
        opened.dataset, source, opened.pixel_offset, opened.meta.transfer_syntax_uid, limit
    )


def check_pixel_data(
    ds: Dataset, fh: BinaryIO, pixel_offset: int | None, tsuid: str, limit: int
) -> PixelShape | None:
    """:func:`check_pixels` on a header ``ds`` whose pixel data element starts at
    ``pixel_offset`` in ``fh`` (None: no pixel data)."""
    if pixel_offset is None:
        return None  # nothing to decode: Rows and the like are only descriptive here
    shape = check_declared_size(ds, limit)
    if shape is None or not is_encapsulated(tsuid):
        return shape  # native: decoding allocates what the header declares, checked above
    _check_fragments(fh, pixel_offset, shape, tsuid)
    return shape


def is_encapsulated(tsuid: str) -> bool:
    """Whether pixel data in ``tsuid`` is encapsulated (PS3.5 A.4): all but the native four."""
    native = ("1.2.840.10008.1.2.1", str(DeflatedExplicitVRLittleEndian), *_ENCODINGS)
    return bool(tsuid) and tsuid not in native


def _check_fragments(fh: BinaryIO, offset: int, shape: PixelShape, tsuid: str) -> None:
    """Count the encapsulated fragments (PS3.5 A.4) and check each codestream header."""
    fh.seek(offset)
    head = fh.read(12)
    if len(head) < 12:
        raise InvalidInstanceError("pixel data element is truncated", STATUS_CANNOT_UNDERSTAND)
    length = struct.unpack("<I", head[8:12])[0]
    if length != UNDEFINED_LENGTH:
        return  # not encapsulated after all (a private syntax): sized by the header check
    pos = offset + 12
    index = 0
    fragments = 0
    while True:
        fh.seek(pos)
        item = fh.read(8)
        if len(item) < 8:
            break  # truncated: the decoder will say so; the count below still bounds it
        group, element, item_length = struct.unpack("<HHI", item)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM or item_length == UNDEFINED_LENGTH:
            raise InvalidInstanceError(
                "encapsulated pixel data is malformed", STATUS_CANNOT_UNDERSTAND
            )
        if index > 0:  # item 0 is the Basic Offset Table
            fragments += 1
            if item_length >= 4:
                _check_codestream(fh.read(min(item_length, _CODESTREAM_HEAD)), shape, tsuid)
        index += 1
        pos += 8 + item_length
    if shape.frames > fragments:
        raise InvalidInstanceError(
            f"NumberOfFrames ({shape.frames}) exceeds the encapsulated fragments ({fragments})",
            STATUS_CANNOT_UNDERSTAND,
        )


def _check_codestream(data: bytes, shape: PixelShape, tsuid: str) -> None:
    """Refuse a JPEG / JPEG-LS (SOFn) or JPEG 2000 (SIZ) header larger than Rows x Columns."""
    dims: tuple[int, int] | None = None
    if data[:2] == b"\xff\x4f" and data[2:4] == b"\xff\x51" and len(data) >= 24:
        # J2K codestream, SIZ right after SOC (ISO 15444-1 A.5.1): Xsiz, Ysiz, XOsiz, YOsiz.
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[8:24])
        dims = (ysiz - yo, xsiz - xo)
    elif data[:4] == b"\x00\x00\x00\x0c" and b"\xff\x4f\xff\x51" in data:
        start = data.index(b"\xff\x4f\xff\x51")
        if len(data) >= start + 24:
            xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[start + 8 : start + 24])
            dims = (ysiz - yo, xsiz - xo)
    elif data[:2] == b"\xff\xd8":
        dims = _jpeg_dims(data)
    if dims is not None and (dims[0] > shape.rows or dims[1] > shape.columns):
        raise InvalidInstanceError(
            f"a compressed frame declares {dims[0]}x{dims[1]} pixels, larger than "
            f"Rows x Columns ({shape.rows}x{shape.columns})",
            STATUS_CANNOT_UNDERSTAND,
        )


def _jpeg_dims(data: bytes) -> tuple[int, int] | None:
    """(lines, samples per line) from the first SOFn / SOF55 marker (ITU T.81 B.2.2)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length
            pos += 2
            continue
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        sof = (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7
        if sof and pos + 9 <= len(data):
            lines, samples = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return lines, samples
        if marker == 0xDA:
            return None
        pos += 2 + length
    return None


def check_part10(path: Path | str, *, limit: int, decoded_limit: int | None = None) -> None:
    """Every bound, without decoding: the whole inflated size (Deflated, counted as it streams
    and dropped; at most ``limit``) and :func:`check_pixels` (at most ``decoded_limit``,
    default ``limit``). Raises like :func:`open_part10`."""
    header = open_part10(path, limit=limit)
    if header.meta.transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        with open(path, "rb") as fh:
            inflated_size(fh, header.meta.dataset_offset, limit)
    check_pixels(header, path, decoded_limit or limit)


def open_checked(source: Path | str | bytes, *, limit: int) -> FileDataset:
    """The whole data set, pixel data included, after :func:`check_pixels` passed.

    For the decoders: what they are given never declares more than ``limit`` decoded bytes,
    nor frames beyond the fragments, nor a codestream larger than Rows x Columns.
    """
    header = open_part10(source, limit=limit, stop_before_pixels=True)
    check_pixels(header, source, limit)
    return open_part10(source, limit=limit, stop_before_pixels=False).dataset
