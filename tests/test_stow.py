"""STOW-RS on a real ``dicom-node serve``: instances land in the same spool and index as
C-STORE, duplicates behave the same, studies complete into the same jobs, and refusals carry
PS3.18 statuses with a FailureReason per instance."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.scu import Peer, collect_files, send_files
from dicom_node.state import AuditEvent, Database, DuplicateEvent, Instance, Job, Series, Study
from tests.dicomgen import ct_series
from tests.peers import NodeProcess, storescu, wait_until

TOKEN = "stow-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOUNDARY = "dicom-node-test-boundary-7f3a"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'

REFERENCED = "00081199"
FAILED = "00081198"
FAILURE_REASON = "00081197"
SOP_INSTANCE = "00081155"
RETRIEVE_URL = "00081190"


def multipart(parts: list[bytes | tuple[bytes, str]], *, close: bool = True) -> bytes:
    """A multipart/related body; a part is bytes (application/dicom) or (bytes, content type)."""
    out = bytearray()
    for part in parts:
        data, ctype = (part, "application/dicom") if isinstance(part, bytes) else part
        out += f"--{BOUNDARY}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
    if close:
        out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


class Stow:
    """Minimal STOW-RS client on raw requests (so bodies can be exactly what a test needs)."""

    def __init__(self, node: NodeProcess) -> None:
        self.base = f"http://127.0.0.1:{node.http_port}/dicom-web"

    def post(
        self,
        body: bytes,
        *,
        study: str | None = None,
        content_type: str = MULTIPART,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        url = self.base + "/studies" + (f"/{study}" if study else "")
        return requests.post(
            url,
            data=body,
            headers={**AUTH, "Content-Type": content_type, "Accept": "application/dicom+json", **(headers or {})},
            timeout=60,
        )


def referenced(r: requests.Response) -> list[str]:
    return [item[SOP_INSTANCE]["Value"][0] for item in r.json().get(REFERENCED, {}).get("Value", [])]


def failures(r: requests.Response) -> list[tuple[str | None, int]]:
    """(SOP Instance UID or None, FailureReason) per failed instance."""
    out = []
    for item in r.json().get(FAILED, {}).get("Value", []):
        uid = item.get(SOP_INSTANCE, {}).get("Value", [None])[0]
        out.append((uid, item[FAILURE_REASON]["Value"][0]))
    return out


def start_node(tmp: Path, database_url: str, **extra: str) -> NodeProcess:
    env = {
        "DICOM_NODE_DATABASE_URL": database_url,
        "DICOM_NODE_STABLE_SECONDS": "1",
        "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0",
        "DICOM_NODE_SCP__RECEIVERS": "1",
        "DICOM_NODE_HTTP__TOKENS": json.dumps([TOKEN]),
        **extra,
    }
    node = NodeProcess(tmp / "var", env).start()
    wait_until(lambda: requests.get(f"http://127.0.0.1:{node.http_port}/healthz", timeout=5).ok, 30, message="healthz")
    return node


@pytest.fixture
def node_db(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    yield db
    db.dispose()


def instances(db: Database, study_uid: str) -> list[Instance]:
    with db.session() as s:
        return list(
            s.scalars(
                select(Instance).join(Study, Study.id == Instance.study_id).where(Study.study_instance_uid == study_uid)
            )
        )


def uid_of(path: Path, keyword: str = "SOPInstanceUID") -> str:
    return str(dcmread(path, stop_before_pixels=True).get(keyword))


def temp_files(node: NodeProcess) -> list[Path]:
    tmp = node.data_dir / "spool" / ".tmp"
    return sorted(tmp.iterdir()) if tmp.is_dir() else []


def test_stow_stores_like_cstore(tmp_path: Path, database_url: str, node_db: Database) -> None:
    node = start_node(tmp_path, database_url)
    try:
        stow = Stow(node)
        study_x = ct_series(tmp_path / "x", slices=4, size=32)  # mixed: STOW and C-STORE
        study_y = ct_series(tmp_path / "y", slices=3, size=32, seed=1)  # C-STORE only
        study_z = ct_series(tmp_path / "z", slices=3, size=32, seed=2)  # STOW only
        x_uid, y_uid, z_uid = (uid_of(s[0], "StudyInstanceUID") for s in (study_x, study_y, study_z))

        # Multi-part STOW of two slices of X, one by dicomweb-client, one slice by C-STORE.
        r = stow.post(multipart([study_x[0].read_bytes(), study_x[1].read_bytes()]))
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"] == "application/dicom+json"
        assert referenced(r) == [uid_of(study_x[0]), uid_of(study_x[1])]
        assert FAILED not in r.json()
        assert r.json()[RETRIEVE_URL]["Value"][0].endswith(f"/dicom-web/studies/{x_uid}")
        first_item = r.json()[REFERENCED]["Value"][0]
        assert first_item[RETRIEVE_URL]["Value"][0].endswith(f"/instances/{uid_of(study_x[0])}")

        client = DICOMwebClient(stow.base, headers=AUTH)
        response = client.store_instances([dcmread(study_x[2])])
        assert [i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence] == [uid_of(study_x[2])]

        assert storescu(node.dicom_port, [study_x[3]]).returncode == 0
        assert storescu(node.dicom_port, study_y).returncode == 0
        # Single-part STOW of Z to its study URL.
        for path in study_z:
            r = stow.post(multipart([path.read_bytes()]), study=z_uid)
            assert r.status_code == 200, r.text

        # Same index: one study row for X with all four instances, whichever way they came.
        rows_x = instances(node_db, x_uid)
        assert sorted(i.sop_instance_uid for i in rows_x) == sorted(uid_of(p) for p in study_x)
        assert sorted(i.source for i in rows_x) == ["dimse", "stow", "stow", "stow"]
        spool = node.data_dir / "spool"
        for row in rows_x + instances(node_db, y_uid) + instances(node_db, z_uid):
            stored = spool / row.path
            assert stored.is_file() and stored.stat().st_size == row.size
            ds = dcmread(stored)
            assert ds.SOPInstanceUID == row.sop_instance_uid
            assert ds.file_meta.TransferSyntaxUID == row.transfer_syntax_uid
        # Raw STOW parts are stored byte for byte (ct_series writes a zero preamble already).
        by_uid = {i.sop_instance_uid: i for i in rows_x}
        for path in study_x[:2]:
            assert (spool / by_uid[uid_of(path)].path).read_bytes() == path.read_bytes()
        with node_db.session() as s:
            series = {x.series_instance_uid: x for x in s.scalars(select(Series))}
        sx, sz = series[uid_of(study_x[0], "SeriesInstanceUID")], series[uid_of(study_z[0], "SeriesInstanceUID")]
        assert (sx.modality, sx.body_part, sx.instance_count) == ("CT", "CHEST", 4)
        assert (sz.modality, sz.body_part, sz.instance_count) == ("CT", "CHEST", 3)

        # Duplicates: identical bytes again are ignored, by either path.
        r = stow.post(multipart([study_x[3].read_bytes()]))  # came by C-STORE first
        assert r.status_code == 200 and referenced(r) == [uid_of(study_x[3])]
        assert storescu(node.dicom_port, [study_x[0]]).returncode == 0  # came by STOW first
        # Different content under a stored SOP Instance UID: kept-first by either path.
        changed = tmp_path / "changed.dcm"
        ds = dcmread(study_x[1])
        ds.SeriesDescription = "CHANGED"
        ds.save_as(changed, enforce_file_format=True)
        r = stow.post(multipart([changed.read_bytes()]))
        assert r.status_code == 200 and referenced(r) == [uid_of(study_x[1])]
        changed_c = tmp_path / "changed-c.dcm"
        ds = dcmread(study_x[2])
        ds.SeriesDescription = "CHANGED"
        ds.save_as(changed_c, enforce_file_format=True)
        assert storescu(node.dicom_port, [changed_c]).returncode == 0
        with node_db.session() as s:
            events = sorted(
                (e.identical, e.action) for e in s.scalars(select(DuplicateEvent))
            )
        assert events == [(False, "kept-first"), (False, "kept-first"), (True, "ignored"), (True, "ignored")]
        assert (spool / by_uid[uid_of(study_x[1])].path).read_bytes() == study_x[1].read_bytes()
        assert len(instances(node_db, x_uid)) == 4

        # /metrics counts STOW-RS next to C-STORE (duplicates answered with success count too).
        def received(source: str) -> float:
            text = requests.get(f"http://127.0.0.1:{node.http_port}/metrics", headers=AUTH, timeout=10).text
            return sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "dicom_node_received_instances_total" and sample.labels.get("source") == source
            )

        assert received("stow") == 3 + 3 + 2
        assert received("dimse") == 1 + 3 + 2

        # Completion does not care how instances came: one job per study, same rule and model.
        def jobs() -> dict[str, Job] | None:
            with node_db.session() as s:
                rows = s.execute(select(Study.study_instance_uid, Job).join(Job, Job.study_id == Study.id)).all()
            found = {uid: job for uid, job in rows}
            return found if len(found) == 3 else None

        found = wait_until(jobs, 60, 0.3, "a job for each of the three studies")
        assert {uid: (j.rule, j.model, j.input_count) for uid, j in found.items()} == {
            x_uid: ("default-ct", "lung-nodules", 4),
            y_uid: ("default-ct", "lung-nodules", 3),
            z_uid: ("default-ct", "lung-nodules", 3),
        }
        # The audit trail names the HTTP user for studies that arrived by STOW-RS (a plain token,
        # as before roles, is named by its position in http.tokens).
        with node_db.session() as s:
            received = {
                (e.actor or "").split("@")[0]
                for e in s.scalars(select(AuditEvent).where(AuditEvent.event == "study-received"))
            }
        assert "http:token-1" in received
        assert temp_files(node) == []
    finally:
        node.stop()


def test_stow_refusals(tmp_path: Path, database_url: str, node_db: Database) -> None:
    cap = 16 * 1024
    node = start_node(
        tmp_path,
        database_url,
        DICOM_NODE_SCP__MAX_INSTANCE_BYTES=str(cap),
        DICOM_NODE_SCP__DUPLICATE_POLICY="reject",
    )
    try:
        stow = Stow(node)
        small = ct_series(tmp_path / "small", slices=3, size=32)  # ~2.5 KiB each
        study = uid_of(small[0], "StudyInstanceUID")
        big = ct_series(tmp_path / "big", slices=1, size=128)  # ~33 KiB
        assert big[0].stat().st_size > cap

        # Wrong study in the URL: 409, each instance failed with A900, nothing stored.
        other = generate_uid()
        r = stow.post(multipart([small[0].read_bytes(), small[1].read_bytes()]), study=other)
        assert r.status_code == 409, r.text
        assert failures(r) == [(uid_of(small[0]), 0xA900), (uid_of(small[1]), 0xA900)]
        assert instances(node_db, study) == []

        # Not DICOM at all: 400 with C000, whether the part says so or lies about it.
        r = stow.post(multipart([(b"hello", "text/plain"), b"\x00" * 200 + b"not dicom"]))
        assert r.status_code == 400, r.text
        assert [reason for _, reason in failures(r)] == [0xC000, 0xC000]

        # Over the size cap: A700 naming the instance; 413 when it is all there was.
        r = stow.post(multipart([big[0].read_bytes()]))
        assert r.status_code == 413, r.text
        assert failures(r) == [(uid_of(big[0]), 0xA700)]

        # Mixed: what can be stored is stored, the rest is reported: 202.
        r = stow.post(multipart([small[0].read_bytes(), (b"{}", "application/json"), big[0].read_bytes()]))
        assert r.status_code == 202, r.text
        assert referenced(r) == [uid_of(small[0])]
        assert failures(r) == [(None, 0xC000), (uid_of(big[0]), 0xA700)]
        assert [i.sop_instance_uid for i in instances(node_db, study)] == [uid_of(small[0])]

        # Duplicate policy "reject": a different instance under a stored UID fails with 0111,
        # as C-STORE does; an identical resend still succeeds.
        ds = dcmread(small[0])
        ds.SeriesDescription = "CHANGED"
        changed = tmp_path / "changed.dcm"
        ds.save_as(changed, enforce_file_format=True)
        r = stow.post(multipart([changed.read_bytes()]))
        assert r.status_code == 409 and failures(r) == [(uid_of(small[0]), 0x0111)]
        files, _ = collect_files([changed])
        (outcome,) = send_files(Peer("AINODE", "127.0.0.1", node.dicom_port), files)
        assert outcome.status == 0x0111
        r = stow.post(multipart([small[0].read_bytes()]))
        assert r.status_code == 200 and referenced(r) == [uid_of(small[0])]

        # A bare dataset (no preamble, no file meta) is given file meta and stored as is.
        bare_ds = dcmread(small[1])
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, bare_ds)
        bare = buffer.getvalue()
        r = stow.post(
            multipart([(bare, "application/dicom; transfer-syntax=1.2.840.10008.1.2.1")]), study=study
        )
        assert r.status_code == 200, r.text
        (row,) = [i for i in instances(node_db, study) if i.sop_instance_uid == uid_of(small[1])]
        stored = (node.data_dir / "spool" / row.path).read_bytes()
        assert stored[128:132] == b"DICM" and stored.endswith(bare)
        assert dcmread(node.data_dir / "spool" / row.path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"

        # A body cut before its closing boundary: complete parts count, the rest is reported.
        r = stow.post(multipart([small[2].read_bytes()], close=False) + b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\npartial")
        assert r.status_code == 202 and referenced(r) == [uid_of(small[2])]
        assert "closing multipart boundary" in r.headers.get("Warning", "")

        # Request-level errors.
        assert stow.post(small[0].read_bytes(), content_type="application/dicom").status_code == 415
        assert stow.post(b"", content_type='multipart/related; type="application/dicom+xml"; boundary=x').status_code == 415
        assert stow.post(b"", content_type='multipart/related; type="application/dicom"').status_code == 400
        assert stow.post(multipart([]), headers={"Accept": "application/dicom+xml"}).status_code == 406
        assert stow.post(b"no boundary anywhere in this body").status_code == 400
        assert stow.post(multipart([small[0].read_bytes()]), study="../../etc").status_code in (400, 404)
        assert requests.post(stow.base + "/studies", data=multipart([small[0].read_bytes()]), headers={"Content-Type": MULTIPART}, timeout=10).status_code == 401

        # Nothing refused or cut off is left behind in the spool.
        assert temp_files(node) == []
        assert len(instances(node_db, study)) == 3
        log = node.log()
        for path in (*small, *big):
            assert uid_of(path) not in log and uid_of(path, "StudyInstanceUID") not in log
        assert "PHICANARY" not in log
    finally:
        node.stop()
