"""Property-based fuzzing of every reader of received Part 10 data: ingest parsing (and the whole
store path), WADO-RS metadata and the preview.

Malformed files are made from small valid seeds (Explicit/Implicit VR LE, Big Endian,
Deflated, JPEG, nested sequences) by truncating, flipping bytes, writing huge or odd lengths,
bad VRs, bogus transfer syntaxes, deflate garbage and deep nesting. The properties: only the
node's own error types escape (no crash), each example finishes within a deadline (no hang),
statuses are DIMSE ones, refusals leave nothing in the spool, and nothing is written outside
the data directory. Derandomized, with a fixed number of examples, so CI runs are repeatable.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node.dicomweb.wado import StoredInstance, instance_metadata
from dicom_node.errors import IngestError
from dicom_node.ingest import Ingestor, parse_part10_bytes
from dicom_node.preview import Preview, PreviewUnavailable, render_preview
from dicom_node.spool import Spool
from dicom_node.state import open_database
from tests.bombs import MIB, base_dataset, encapsulated, encode, good_instance, jpeg_frame, part10
from tests.scp_support import spool_files, temp_files

LIMIT = 8 * MIB
EXAMPLES = 250
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=timedelta(seconds=5),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_TS_CHOICES = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.5",
    "1.2.3.4",
    "",
    "not a uid\x00",
]
_DIMSE_STATUSES = {0x0000, 0xA700, 0xA900, 0xC000, 0xC001, 0xC002, 0x0111}


def _body(ds: Dataset, implicit: bool = False, little: bool = True) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = little, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def _with_pixels(ds: Dataset) -> Dataset:
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.PixelData = bytes(ds.Rows * ds.Columns * 2)
    return ds


def _nested(depth: int) -> Dataset:
    ds = _with_pixels(base_dataset(rows=4, columns=4))
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(depth):
        outer = Dataset()
        outer.ConceptNameCodeSequence = Sequence([inner])
        inner = outer
    ds.ContentSequence = Sequence([inner])
    return ds


def _seeds() -> list[bytes]:
    ex = _with_pixels(base_dataset())
    im = _with_pixels(base_dataset())
    be = _with_pixels(base_dataset())
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = c.compress(_body(ex)) + c.flush()
    jpeg = base_dataset(rows=16, columns=16, frames=2)
    jpeg.BitsAllocated, jpeg.BitsStored, jpeg.HighBit = 8, 8, 7
    enhanced = base_dataset(rows=4, columns=4, frames=2)
    fg = Dataset()
    pos = Dataset()
    pos.ImagePositionPatient = [0, 0, 1]
    fg.PlanePositionSequence = Sequence([pos])
    enhanced.PerFrameFunctionalGroupsSequence = Sequence([fg, fg])
    enhanced.PixelData = bytes(4 * 4 * 2 * 2)
    return [
        good_instance()[0],
        part10(im, "1.2.840.10008.1.2", _body(im, implicit=True)),
        part10(be, "1.2.840.10008.1.2.2", _body(be, little=False)),
        part10(ex, "1.2.840.10008.1.2.1.99", deflated),
        part10(
            jpeg, "1.2.840.10008.1.2.4.50", encode(jpeg) + encapsulated([jpeg_frame(16, 16)] * 2)
        ),
        part10(enhanced, "1.2.840.10008.1.2.1", encode(enhanced)),
        part10(_nested(80), "1.2.840.10008.1.2.1", encode(_nested(80))),
    ]


SEEDS = _seeds()


def _retarget(data: bytes, tsuid: str) -> bytes:
    """The same data set under another (maybe bogus) Transfer Syntax UID in the file meta."""
    if len(data) < 144:
        return data
    offset = 132 + 12 + struct.unpack("<I", data[140:144])[0]
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3"
    return part10(ds, tsuid, data[offset:]) if tsuid else data[:offset] + data[offset:]


_MUTATION = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16)),
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(
        st.just("u32"),
        st.integers(0, 1 << 16),
        st.sampled_from([0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x10000000, 1, 0]),
    ),
    st.tuples(st.just("u16"), st.integers(0, 1 << 16), st.integers(0, 0xFFFF)),
    st.tuples(st.just("vr"), st.integers(0, 1 << 16), st.binary(min_size=2, max_size=2)),
    st.tuples(st.just("ts"), st.sampled_from(_TS_CHOICES)),
    st.tuples(st.just("garbage"), st.binary(min_size=0, max_size=512)),
)


def _mutate(data: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    buf = bytearray(data)
    for op in ops:
        kind = op[0]
        if kind == "ts":
            buf = bytearray(_retarget(bytes(buf), op[1]))
            continue
        if kind == "garbage":  # the data set replaced with raw bytes (deflate garbage, too)
            offset = 132 + 12 + struct.unpack("<I", buf[140:144])[0] if len(buf) > 144 else 0
            buf = buf[:offset] + bytearray(op[1])
            continue
        if not buf:
            continue
        pos = op[1] % len(buf)
        if kind == "truncate":
            del buf[pos:]
        elif kind == "flip":
            buf[pos] = op[2]
        elif kind == "u32":
            buf[pos : pos + 4] = struct.pack("<I", op[2])
        elif kind == "u16":
            buf[pos : pos + 2] = struct.pack("<H", op[2])
        elif kind == "vr":
            buf[pos : pos + 2] = op[2]
    return bytes(buf)


HOSTILE = st.builds(
    _mutate,
    st.sampled_from(SEEDS),
    st.lists(_MUTATION, min_size=1, max_size=4),
)


# -- the environment: a real ingestor, spool and database ---------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from dicom_node.settings import load_settings

    root = tmp_path_factory.mktemp("fuzz")
    settings_ = load_settings(
        None,
        data_dir=root / "var",
        bind="127.0.0.1",
        scp={"max_instance_bytes": LIMIT, "max_decoded_bytes": LIMIT, "fsync": False},
    )
    db = open_database(settings_.resolved_database_url)
    spool = Spool(settings_.spool_dir, fsync=False)
    spool.prepare()
    ingestor = Ingestor(settings_, db, spool)
    yield root, settings_, spool, ingestor
    db.dispose()


def _outside(root: Path, data_dir: Path) -> set[str]:
    """Files under the test root outside the data directory, and new entries in the cwd."""
    found = {str(p) for p in root.rglob("*") if data_dir not in p.parents and p != data_dir}
    return found | {f"cwd:{n}" for n in os.listdir(".")}


def _check_contained(env: Any, run: Callable[[], None]) -> None:
    root, settings_, _, _ = env
    before = _outside(root, settings_.data_dir)
    run()
    assert _outside(root, settings_.data_dir) == before


# -- properties ---------------------------------------------------------------------------------


@FUZZ
@given(data=HOSTILE)
def test_fuzz_ingest_parsing_raises_only_node_errors(data: bytes) -> None:
    try:
        parsed = parse_part10_bytes(data, max_inflated_bytes=LIMIT)
    except IngestError as exc:
        assert exc.status in _DIMSE_STATUSES
        return
    assert parsed.sop_instance_uid and parsed.study_instance_uid


@FUZZ
@given(data=HOSTILE)
def test_fuzz_ingest_stores_or_refuses_cleanly(env: Any, data: bytes) -> None:
    _, settings_, _, ingestor = env
    stored_before = len(spool_files(settings_.data_dir))

    def run() -> None:
        result = ingestor.ingest_bytes(bytearray(data), calling_ae_title="FUZZ")
        assert result.status in _DIMSE_STATUSES
        if result.status not in (0x0000, 0x0111):
            assert len(spool_files(settings_.data_dir)) == stored_before
        assert temp_files(settings_.data_dir) == []

    _check_contained(env, run)


@FUZZ
@given(data=HOSTILE)
def test_fuzz_wado_metadata_never_raises(env: Any, data: bytes) -> None:
    _, _, spool, _ = env
    temp = spool.write_temp(data)
    try:
        relative = os.path.relpath(temp, spool.root)
        item = StoredInstance(
            "1.2",
            "1.2.3",
            "1.2.3.4",
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.840.10008.1.2.1",
            relative,
            len(data),
            None,
        )

        def run() -> None:
            out = instance_metadata(spool, item, limit=LIMIT)
            assert out is None or isinstance(out, dict)

        _check_contained(env, run)
    finally:
        spool.discard(temp)


FOUND = Path(__file__).parent / "fuzz_corpus" / "part10"
"""Inputs the suite's fuzzing once found (malformed position/orientation values that reached
``float()`` in the preview), kept as fixed examples."""


@FUZZ
@given(data=HOSTILE)
@example(data=(FOUND / "found-preview-geometry-1.dcm").read_bytes())
@example(data=(FOUND / "found-preview-geometry-2.dcm").read_bytes())
def test_fuzz_preview_refuses_with_its_own_error(env: Any, data: bytes) -> None:
    _, _, spool, _ = env
    temp = spool.write_temp(data)
    try:

        def run() -> None:
            try:
                out = render_preview([temp], [], limit=LIMIT)
            except PreviewUnavailable as exc:
                assert str(exc)
                return
            assert isinstance(out, Preview) and out.png.startswith(b"\x89PNG")

        _check_contained(env, run)
    finally:
        spool.discard(temp)
