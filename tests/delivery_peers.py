"""Helpers for the write-back tests: result-like objects, and a small DICOMweb reverse proxy.

The proxy sits in front of a real Orthanc for what Orthanc cannot do itself: demand a bearer
token, serve HTTPS with a certificate from a private CA (trustme), or misbehave at the wire on
purpose (answer 409/503, or store and then drop the answer). Everything else is forwarded to
Orthanc untouched, so QIDO-RS and WADO-RS behind it are Orthanc's own.
"""

from __future__ import annotations

import io
import json
import re
import ssl
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.dicomgen import ct_series
from tests.peers import Orthanc, free_port

OUR_MANUFACTURER = "dicom-node"
OUR_DESCRIPTION = "AI: lung nodules (v1.2.0)"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def result_objects(out_dir: Path, *, slices: int = 4, study_uid: str | None = None) -> list[Path]:
    """A source CT series and two result-like objects in its study, written under ``out_dir``:
    a real highdicom SEG of the series and a Basic Text SR, both marked as the node's output
    (Manufacturer, "AI: ..." series description, fixed content date/time). Returns [SEG, SR]."""
    import highdicom as hd

    study_uid = study_uid or generate_uid()
    ct_paths = ct_series(out_dir / "ct", slices=slices, size=32, study_uid=study_uid)
    sources = [pydicom.dcmread(p) for p in ct_paths]
    mask = np.zeros((len(sources), 32, 32), dtype=bool)
    mask[1:3, 10:20, 12:22] = True
    algorithm = hd.AlgorithmIdentificationSequence(
        name="lung-nodules",
        version="1.2.0",
        family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence"),
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=1,
                segment_label="nodule",
                segmented_property_category=hd.sr.CodedConcept(
                    "49755003", "SCT", "Morphologically abnormal structure"
                ),
                segmented_property_type=hd.sr.CodedConcept("27925004", "SCT", "Nodule"),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        ],
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=OUR_MANUFACTURER,
        manufacturer_model_name="lung-nodules",
        software_versions="1.2.0",
        device_serial_number="node-1",
        series_description=OUR_DESCRIPTION,
        content_date=sources[0].StudyDate,
        content_time="093000",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    seg_path = out_dir / "result-seg.dcm"
    seg.save_as(seg_path)
    sr_path = out_dir / "result-sr.dcm"
    basic_text_sr(sources[0], generate_uid(), generate_uid()).save_as(
        sr_path, enforce_file_format=True
    )
    return [seg_path, sr_path]


def basic_text_sr(source: Dataset, series_uid: str, sop_uid: str) -> Dataset:
    """A minimal Basic Text SR in the source's study, marked as the node's output."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = sop_uid
    for keyword in (
        "StudyInstanceUID",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
    ):
        setattr(ds, keyword, source.get(keyword, ""))
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "SR"
    ds.SeriesNumber = 902
    ds.InstanceNumber = 1
    ds.Manufacturer = OUR_MANUFACTURER
    ds.SoftwareVersions = "1.2.0"
    ds.SeriesDescription = OUR_DESCRIPTION
    ds.ContentDate = source.StudyDate
    ds.ContentTime = "093000"
    ds.ValueType = "CONTAINER"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = (
        "18748-4",
        "LN",
        "Diagnostic imaging report",
    )
    ds.ConceptNameCodeSequence = [concept]
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "PARTIAL"
    ds.VerificationFlag = "UNVERIFIED"
    text = Dataset()
    text.RelationshipType = "CONTAINS"
    text.ValueType = "TEXT"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    text.ConceptNameCodeSequence = [name]
    text.TextValue = "Test finding (no patient data)."
    ds.ContentSequence = [text]
    return ds


def foreign_copy(ours: Path, out: Path, **changes: Any) -> Path:
    """Someone else's object under our SOP Instance UID: our file with ``changes`` applied."""
    ds = pydicom.dcmread(ours)
    for keyword, value in (changes or {"Manufacturer": "another-vendor"}).items():
        setattr(ds, keyword, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out)
    return out


def sop_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def orthanc_copies(orthanc: Orthanc, paths: Sequence[Path]) -> dict[str, int]:
    """How many instances Orthanc holds for each of our SOP Instance UIDs (by C-FIND-like lookup)."""
    counts = {}
    for path in paths:
        uid = sop_uid_of(path)
        r = orthanc.post("/tools/lookup", data=uid)
        r.raise_for_status()
        counts[uid] = sum(1 for item in r.json() if item.get("Type") == "Instance")
    return counts


def orthanc_file(orthanc: Orthanc, path: Path) -> bytes | None:
    """The file Orthanc stores under the SOP Instance UID of ``path`` (None if absent)."""
    r = orthanc.post("/tools/lookup", data=sop_uid_of(path))
    r.raise_for_status()
    ids = [item["ID"] for item in r.json() if item.get("Type") == "Instance"]
    if not ids:
        return None
    return orthanc.get(f"/instances/{ids[0]}/file").content


# -- the proxy ------------------------------------------------------------------------------------


class DicomwebProxy:
    """A reverse proxy to ``upstream`` Orthanc on 127.0.0.1 (optionally HTTPS, optionally with a
    bearer token). Faults queued in ``stow_faults`` apply, in order, to the next STOW-RS POSTs:

    * ``"drop-response"``: forward to Orthanc (which stores), then close without answering;
    * ``"conflict"``: answer 409 with a FailedSOPSequence (reason 45070, "already stored")
      without forwarding, like Microsoft's DICOM service does for an existing instance;
    * an HTTP status such as ``503`` or ``429``: answer it without forwarding;
    * ``("delay", seconds)``: wait, then forward normally (a slow PACS);
    * ``("partial", reason)``: forward only the first instance, and answer 202 with the others in
      the FailedSOPSequence with that FailureReason (e.g. 0xA700, a full disk; PS3.18 10.5.3).
    """

    def __init__(
        self,
        upstream: Orthanc,
        *,
        bearer_token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.upstream = upstream
        self.bearer_token = bearer_token
        self.tls = tls
        self.port = free_port()
        self.stow_faults: list[str | int | tuple[str, int]] = []
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/dicom-web"

    def start(self) -> DicomwebProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                proxy.handle(self, "GET")

            def do_POST(self) -> None:
                proxy.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # -- request handling ---------------------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        with self.lock:
            self.seen.append(
                {"method": method, "path": h.path, "authorization": h.headers.get("Authorization")}
            )
        if (
            self.bearer_token is not None
            and h.headers.get("Authorization") != f"Bearer {self.bearer_token}"
        ):
            self._answer(
                h,
                401,
                b'{"error": "bearer token required"}',
                "application/json",
                extra={"WWW-Authenticate": 'Bearer realm="dicom-web"'},
            )
            return
        fault: str | int | tuple[str, int] | None = None
        if method == "POST" and h.path.rstrip("/").endswith("/studies"):
            with self.lock:
                fault = self.stow_faults.pop(0) if self.stow_faults else None
        if isinstance(fault, int):
            self._answer(h, fault, b"", "text/plain")
            return
        if fault == "conflict":
            self._answer(
                h,
                409,
                json.dumps(conflict_answer(h.headers.get("Content-Type", ""), body)).encode(),
                "application/dicom+json",
            )
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() in ("content-type", "accept")}
        if isinstance(fault, tuple) and fault[0] == "delay":
            time.sleep(fault[1])  # a slow PACS: forward (and store) only after a pause
            fault = None
        if isinstance(fault, tuple):
            self._partial(h, headers, body, fault[1])
            return
        upstream = requests.request(
            method,
            self.upstream.url + h.path,
            data=body or None,
            headers=headers,
            auth=self.upstream.auth,
            timeout=60,
        )
        if fault == "drop-response":
            h.close_connection = True
            h.connection.close()
            return
        self._answer(
            h, upstream.status_code, upstream.content, upstream.headers.get("Content-Type", "")
        )

    def _partial(
        self, h: BaseHTTPRequestHandler, headers: dict[str, str], body: bytes, reason: int
    ) -> None:
        ctype = headers.get("Content-Type", "")
        boundary = b"--" + re.search(r'boundary="?([^";]+)"?', ctype).group(1).encode()  # type: ignore[union-attr]
        parts = body.split(boundary)
        first_only = boundary.join([parts[0], parts[1], b"--\r\n"])
        upstream = requests.post(
            self.upstream.url + h.path,
            data=first_only,
            headers=headers,
            auth=self.upstream.auth,
            timeout=60,
        )
        answer = upstream.json()
        answer["00081198"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
                    "00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]},
                    "00081197": {"vr": "US", "Value": [reason]},
                }
                for ds in multipart_instances(ctype, body)[1:]
            ],
        }
        self._answer(h, 202, json.dumps(answer).encode(), "application/dicom+json")

    @staticmethod
    def _answer(
        h: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        ctype: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        h.send_response(status)
        if ctype:
            h.send_header("Content-Type", ctype)
        for k, v in (extra or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if body:
            h.wfile.write(body)


def multipart_instances(content_type: str, body: bytes) -> list[Dataset]:
    """The DICOM parts of a multipart/related STOW-RS body (headers only)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        return []
    boundary = b"--" + match.group(1).encode()
    out = []
    for part in body.split(boundary)[1:]:
        if part.startswith(b"--"):
            break
        _, _, payload = part.partition(b"\r\n\r\n")
        payload = payload.removesuffix(b"\r\n")
        out.append(pydicom.dcmread(io.BytesIO(payload), stop_before_pixels=True))
    return out


def conflict_answer(content_type: str, body: bytes) -> dict[str, Any]:
    """A PS3.18 Store Instances Response listing every instance as failed with 45070."""
    failed = []
    for ds in multipart_instances(content_type, body):
        failed.append(
            {
                "00081150": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
                "00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]},
                "00081197": {"vr": "US", "Value": [45070]},
            }
        )
    return {"00081198": {"vr": "SQ", "Value": failed}}


def tls_server_context(tmp: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context with a certificate for 127.0.0.1 from a fresh private CA, and the CA's
    PEM file (what a client must be told to trust)."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    ca_path = tmp / "test-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    return ctx, ca_path
