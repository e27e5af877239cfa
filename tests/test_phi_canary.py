"""Patient data stays in the images: a run with canary patient names leaves audit and log lines
for every step, and the canary appears in no log line, audit record, job record, Redis key or
value, or exception text."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from sqlalchemy import select

from dicom_node.state import AuditEvent, Job, JobState, Study
from tests.dicomgen import CANARY_ID, CANARY_NAME, ct_series
from tests.peers import Orthanc, RedisServer, storescu
from tests.pipeline_env import NodeEnv

pytestmark = pytest.mark.slow

CANARIES = ("PHICANARY", CANARY_ID, CANARY_NAME.split("^")[0])

# Malformed values as real archives hold them, one per VR that results copy (or that is read
# near them), each carrying its own canary: none may reach a log, a reason or the outputs.
# Written as stored bytes, so pydicom's checks on assignment cannot refuse or repair them.
MALFORMED: dict[str, tuple[str, bytes]] = {
    "PatientBirthDate": ("DA", b"QZXA1234"),  # letters in a date (what broke build_viewer_sr)
    "StudyDate": ("DA", b"2026QZXB"),
    "StudyTime": ("TM", b"99:99QZXC"),
    "PatientBirthTime": ("TM", b"QZXD"),
    "AcquisitionDateTime": ("DT", b"QZXE2026"),  # not copied; read nowhere it may leak
    "PatientName": ("PN", b"QZXF^a^b^c^d^e"),  # six components
    "ReferringPhysicianName": ("PN", b"QZXG=a=b=c"),  # four component groups
    "OtherPatientNames": ("PN", b"QZXH\xff\xfe"),  # bytes that are not UTF-8
    "StudyDescription": ("LO", b"QZXI" + b"x" * 70),  # over-long
    "IssuerOfPatientID": ("LO", b"QZXJ\x01"),  # control character
    "AccessionNumber": ("SH", b"QZXK-ACCESSION-TOO-LONG"),
    "Occupation": ("SH", b"QZXL\\second"),  # two values for VM 1
    "PatientSex": ("CS", b"QZXM"),  # not an enumerated value
    "SmokingStatus": ("CS", "QZXNÉ".encode()),  # non-ASCII in a CS
    "PatientAge": ("AS", b"QZXO"),
    "PatientWeight": ("DS", b"QZXP"),
    "PatientSize": ("DS", b"1.7QZXQ"),
    "StudyID": ("SH", b"QZXS\x07"),
    "StageNumber": ("IS", b"QZXU"),  # not copied
}
MALFORMED_UID = "1.2.QZXR"  # in a copied sequence (Referenced Study Sequence)
MALFORMED_CANARIES = (*(v[v.index(b"QZX") :][:4].decode() for _, v in MALFORMED.values()), "QZXR")


def malform(paths: Sequence[Path]) -> None:
    """Give every instance of a series the malformed values above (UTF-8 character set)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.save_as(path, enforce_file_format=True)
        # Re-read so that the character set is the file's own: pydicom writes stored bytes
        # unchanged only then (a changed character set makes it decode and re-encode them).
        ds = pydicom.dcmread(path)
        for keyword, (vr, value) in MALFORMED.items():
            tag = Tag(tag_for_keyword(keyword))
            padded = value + b" " if len(value) % 2 else value
            ds._dict[tag] = RawDataElement(tag, vr, len(padded), padded, 0, False, True)
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        item.add_new(0x00081155, "UI", MALFORMED_UID)
        ds.ReferencedStudySequence = DicomSequence([item])
        ds.save_as(path, enforce_file_format=True)


def _redis_dump(redis_server: RedisServer) -> str:
    client = redis_server.client()
    parts = []
    for key in client.scan_iter(count=1000):
        parts.append(key.decode(errors="replace"))
        kind = client.type(key).decode()
        if kind == "string":
            parts.append(client.get(key).decode(errors="replace"))
        elif kind == "list":
            parts.extend(v.decode(errors="replace") for v in client.lrange(key, 0, -1))
        elif kind == "hash":
            parts.extend(
                f"{k.decode(errors='replace')}={v.decode(errors='replace')}"
                for k, v in client.hgetall(key).items()
            )
        elif kind == "set":
            parts.extend(v.decode(errors="replace") for v in client.smembers(key))
        elif kind == "zset":
            parts.extend(v.decode(errors="replace") for v in client.zrange(key, 0, -1))
    return "\n".join(parts)


def undecodable(paths: Sequence[Path]) -> None:
    """Make a series' pixel data RLE Lossless frames that cannot be decoded (a failing decoder)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    for path in paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = RLELossless
        # An RLE header announcing one segment at an offset past the end: not decodable.
        header = (1).to_bytes(4, "little") + (64_000).to_bytes(4, "little") + bytes(56)
        ds.PixelData = encapsulate([header + b"QZXV" * 16])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.save_as(path, enforce_file_format=True)


def _study_uid(paths: Sequence[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def test_canary_patient_data_never_leaks(
    tmp_path: Path, database_url: str, redis_server: RedisServer, clean_orthanc: Orthanc
) -> None:
    env = NodeEnv(
        tmp_path / "n",
        database_url,
        broker_url=redis_server.url,
        extra_env={
            "DICOM_NODE_DESTINATION": clean_orthanc.dicomweb_url_with_credentials,
            "DICOM_NODE_LOG__LEVEL": "DEBUG",
        },
    ).start()
    try:
        env.add_worker()
        # Four studies, each with canary patient data: one processed and delivered, one that
        # crashes its worker (exception and failure paths must be clean too), one whose headers
        # hold malformed values in every VR results copy (it must still be done), and one whose
        # pixel data cannot be decoded (it fails, with a reason that names no value).
        ok = ct_series(
            tmp_path / "ok", slices=8, size=64, patient_name=CANARY_NAME, patient_id=CANARY_ID
        )
        poison = ct_series(
            tmp_path / "poison",
            slices=8,
            size=64,
            patient_name=CANARY_NAME,
            patient_id=CANARY_ID,
            description="POISON",
        )
        malformed = ct_series(
            tmp_path / "malformed",
            slices=8,
            size=64,
            patient_name=CANARY_NAME,
            patient_id=CANARY_ID,
        )
        malform(malformed)
        broken = ct_series(
            tmp_path / "broken", slices=8, size=64, patient_name="QZXW^DECODE", patient_id="QZXW-ID"
        )
        undecodable(broken)
        for series in (ok, poison, malformed):
            env.send(series)
        sent = storescu(env.node.dicom_port, broken, extra=["-xr"])  # propose RLE Lossless
        assert sent.returncode == 0, sent.stdout + sent.stderr
        jobs = env.wait_all_terminal(4, timeout=240)

        with env.db.session() as s:
            audit = list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)))
            job_rows = list(s.scalars(select(Job)))
            study_uid_of = {st.id: st.study_instance_uid for st in s.scalars(select(Study))}
        by_study = {study_uid_of[j.study_id]: j for j in job_rows}
        outcome = {
            name: (by_study[_study_uid(paths)].state, by_study[_study_uid(paths)].reason)
            for name, paths in (
                ("ok", ok),
                ("poison", poison),
                ("malformed", malformed),
                ("broken", broken),
            )
        }
        assert outcome["ok"][0] == outcome["malformed"][0] == JobState.DONE.value, (
            outcome,
            env.diagnostics(),
        )
        assert outcome["poison"][0] == outcome["broken"][0] == JobState.FAILED.value, (
            outcome,
            env.diagnostics(),
        )
        assert "cannot decode pixel data" in (outcome["broken"][1] or ""), outcome
        assert len(jobs) == 4
        events = {a.event for a in audit}
        assert {
            "node-started",
            "association-accepted",
            "study-received",
            "study-completed",
            "job-state",
            "result-delivered",
        } <= events
        done = by_study[_study_uid(ok)]
        job_states = [
            a.detail.get("state") for a in audit if a.event == "job-state" and a.job_id == done.id
        ]
        assert {"waiting", "running", "delivering", "done"} <= set(job_states)

        base = f"http://127.0.0.1:{env.node.http_port}"
        pages = [requests.get(base + "/api/jobs", timeout=10), requests.get(base + "/", timeout=10)]
        for job in job_rows:
            pages += [
                requests.get(f"{base}/api/jobs/{job.id}", timeout=10),
                requests.get(f"{base}/jobs/{job.id}", timeout=10),
            ]
        assert all(page.status_code == 200 for page in pages), [page.status_code for page in pages]

        logs = env.node.log() + "".join(w.log() for w in env.workers)
        assert f"job={done.id}" in logs, "log lines carry the job id"
        texts = {
            "node and worker logs": logs,
            "audit records": json.dumps(
                [[a.event, a.actor, a.outcome, a.study_key, a.job_id, a.detail] for a in audit]
            ),
            "job records": json.dumps(
                [[j.reason, j.summary, j.timings, j.rule, j.model] for j in job_rows]
            ),
            "the API's job JSON and the dashboard": "\n".join(page.text for page in pages),
            "redis keys and values": _redis_dump(redis_server),
        }
        for where, text in texts.items():
            for canary in (*CANARIES, *MALFORMED_CANARIES, "QZXV", "QZXW"):
                assert canary not in text, f"patient data ({canary!r}) leaked into {where}"
        # The canaries are where they belong: in the stored images.
        spooled = b"".join(p.read_bytes() for p in (env.node.data_dir / "spool").rglob("*.dcm"))
        assert CANARY_ID.encode() in spooled
        assert all(canary.encode() in spooled for canary in MALFORMED_CANARIES)
    finally:
        env.stop()


_LIBRARY_NOISE = r"""
import logging, sys
from pydicom.dataset import Dataset
from pydicom.valuerep import DA
from dicom_node.errors import JobError
from dicom_node.logs import setup_logging
from dicom_node.settings import LogSettings

setup_logging(LogSettings(level="DEBUG", json=sys.argv[1] == "json"), stream=sys.stdout)
Dataset().PatientBirthDate = "QZXA1234"  # pydicom: warnings module and its own logger
logging.getLogger("highdicom.base").warning(
    'value of argument "patient_name" is potentially invalid: "QZXF^X"'
)
logging.getLogger("sqlalchemy.engine.Engine").info("[generated in 0.001s] %r", ("QZXK", 20260101))
logging.getLogger("uvicorn.access").warning(
    '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/api/studies?patient_id=QZXW", "1.1", 200
)
logging.getLogger("uvicorn.access").warning(
    '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/dicom-web/studies/1.2.826.0.1.3680043.2.1",
    "1.1", 200
)
logging.getLogger("pynetdicom.dsutils").setLevel(logging.DEBUG)
logging.getLogger("pynetdicom.dsutils").debug("(0010,0010) PN [QZXG]")
logging.getLogger("celery.app.trace").error(
    "Task run_job raised unexpected: %r", ValueError("'QZXB'")
)
try:
    DA("QZXC1234")
except ValueError:
    logging.getLogger("workers.pipeline").exception("job attempt 1 failed unexpectedly")
try:
    raise JobError("building the SR failed: ValueError") from ValueError("QZXD")
except JobError as exc:
    logging.getLogger("workers.pipeline").error("job failed: %s", exc, exc_info=True)
logging.getLogger("workers.pipeline").warning("delivery failed: %s", ValueError("QZXE"))
"""


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_library_records_and_tracebacks_are_scrubbed(fmt: str) -> None:
    """What pydicom, highdicom, SQLAlchemy, uvicorn, pynetdicom and Celery log (and exception
    tracebacks) passes the node's filter: the events stay, the values go."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _LIBRARY_NOISE, fmt],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = run.stdout + run.stderr
    assert "QZX" not in out, out
    assert "1.2.826.0.1.3680043.2.1" not in out, out
    for kept in (
        "Invalid value for VR DA",  # pydicom's logger
        "UserWarning",  # the same warning, through py.warnings
        "potentially invalid",
        "GET /api/studies HTTP/1.1",
        "GET /dicom-web/studies/<uid> HTTP/1.1",
        "raised unexpected: ValueError",
        "job attempt 1 failed unexpectedly",
        "Traceback (most recent call last)",
        "valuerep.py",  # the frames stay
        "ValueError: <withheld>",
        "JobError: building the SR failed: ValueError",
        "delivery failed: ValueError",
    ):
        assert kept in out, (kept, out)
    assert "(0010,0010)" not in out  # pynetdicom's dataset dumps are dropped


def test_failure_reasons_name_the_stage_and_type_not_the_value() -> None:
    """What the job record, the API and the dashboard show for a library's exception: the stage
    and the exception type; our own errors keep their (patient-free) message."""
    from pydicom.valuerep import DA

    from dicom_node.errors import JobError
    from workers.pipeline import _failure_reason

    with pytest.raises(ValueError) as caught:
        DA("QZXA1234")
    assert "QZXA" in str(caught.value)  # what used to become the reason
    assert _failure_reason(caught.value, "encode") == "encoding the results failed: ValueError"
    assert _failure_reason(caught.value, None) == "the job failed: ValueError"
    assert (
        _failure_reason(JobError("no series qualifies"), "load") == "JobError: no series qualifies"
    )
