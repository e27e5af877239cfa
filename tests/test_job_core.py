"""The job core (``dicom_node.jobs``): a worker whose lease was taken over can write neither
outputs nor delivery state, directly (SQLite and PostgreSQL) or through the node's result store
API (a real ``dicom-node serve``)."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import func, select

from dicom_node import jobs
from dicom_node.completion import complete_due_studies
from dicom_node.state import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Outbox,
    Output,
    open_database,
    utcnow,
)
from tests.dicomgen import ct_series
from tests.peers import NodeProcess, storescu, wait_until

OLD, NEW = "gpu-a:101", "gpu-b:202"


def _expire(db: Any, job_id: str) -> None:
    with db.session() as s:
        s.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)


def _outputs(sha: str = "0" * 64) -> list[jobs.OutputRecord]:
    return [
        jobs.OutputRecord("sr", "x/sr.dcm", 10, sha, "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.1", "1.2.3"),
        jobs.OutputRecord("summary", "x/summary.json", 2, sha),
    ]


def _counts(db: Any, job_id: str) -> tuple[int, int]:
    with db.session() as s:
        outputs = s.scalar(select(func.count()).select_from(Output).where(Output.job_id == job_id))
        deliveries = s.scalar(select(func.count()).select_from(Delivery).where(Delivery.job_id == job_id))
    return int(outputs or 0), int(deliveries or 0)


def _job_for_two_destinations(receiver: Any, tmp_path: Path) -> str:
    port = receiver.server.server_address[1]
    assert storescu(port, ct_series(tmp_path / "s", slices=4, size=32), aet=receiver.settings.ae_title).returncode == 0
    (job_id,) = complete_due_studies(receiver.db, receiver.settings, now=utcnow() + timedelta(seconds=60))
    with receiver.db.session() as s:
        s.get(Job, job_id).destinations = ["pacs", "archive"]
        s.query(Outbox).delete()
    return str(job_id)


def test_a_worker_whose_lease_was_taken_over_writes_no_outputs_or_deliveries(
    receiver: Any, tmp_path: Path
) -> None:
    db = receiver.db
    job_id = _job_for_two_destinations(receiver, tmp_path)

    # The model phase: OLD claims, stalls past its lease, NEW takes over.
    assert jobs.claim(db, job_id, OLD, 60).outcome is jobs.ClaimOutcome.CLAIMED
    _expire(db, job_id)
    assert jobs.claim(db, job_id, NEW, 60).outcome is jobs.ClaimOutcome.CLAIMED
    stale = jobs.record_outputs(db, job_id, OLD, _outputs("a" * 64), summary={"findings": 9}, timings={"detect": 1.0})
    assert stale is jobs.Recorded.LEASE_LOST
    assert _counts(db, job_id) == (0, 0), "the stale worker wrote rows"
    assert not jobs.update_job(db, job_id, OLD, model_version="stale")
    assert not jobs.finish(db, job_id, OLD, JobState.FAILED, "stale", timings={"detect": 9.0})
    assert not jobs.release_for_retry(db, job_id, OLD, "stale", 1.0)
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.RUNNING.value and job.lease_owner == NEW and job.summary == {}

    # The holder records: outputs, one delivery per destination, a delivery message.
    recorded = jobs.record_outputs(db, job_id, NEW, _outputs("b" * 64), summary={"findings": 1}, timings={"detect": 2.0})
    assert recorded is jobs.Recorded.DELIVERING
    assert _counts(db, job_id) == (2, 2)
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.DELIVERING.value and job.lease_owner is None
        assert {o.sha256 for o in job.outputs} == {"b" * 64}
        assert [o.task for o in s.scalars(select(Outbox).where(Outbox.job_id == job_id))] == ["dicom_node.deliver"]
    # A model worker never takes a delivering job; a late record from OLD still changes nothing.
    assert jobs.claim(db, job_id, OLD, 60).outcome is jobs.ClaimOutcome.BUSY
    assert jobs.record_outputs(db, job_id, OLD, _outputs("c" * 64), summary={}, timings={}) is jobs.Recorded.LEASE_LOST

    # The delivery phase: D1 claims, stalls, D2 takes over; D1's attempt records are refused.
    assert jobs.claim(db, job_id, "central:1", 60, delivery=True).outcome is jobs.ClaimOutcome.CLAIMED
    _expire(db, job_id)
    assert jobs.claim(db, job_id, "central:2", 60, delivery=True).outcome is jobs.ClaimOutcome.CLAIMED
    todo = jobs.open_deliveries(db, job_id)
    assert len(todo) == 2
    for d in todo:
        assert not jobs.record_attempt(db, job_id, "central:1", d.id, DeliveryState.DONE, 1)
    assert not jobs.park_for_delivery(db, job_id, "central:1", utcnow())
    assert not jobs.finish(db, job_id, "central:1", JobState.DONE)
    with db.session() as s:
        states = [(d.state, d.attempts, d.delivered_at) for d in s.scalars(select(Delivery).where(Delivery.job_id == job_id))]
    assert states == [(DeliveryState.PENDING.value, 0, None)] * 2
    for d in todo:
        assert jobs.record_attempt(db, job_id, "central:2", d.id, DeliveryState.DONE, 1)
    assert jobs.finish(db, job_id, "central:2", JobState.DONE, timings={"deliver": 0.5})
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.DONE.value
        assert job.timings == {"detect": 2.0, "deliver": 0.5}
        assert all(d.state == DeliveryState.DONE.value and d.delivered_at for d in job.deliveries)


def test_a_worker_that_shares_the_store_keeps_the_lease_to_deliver_at_once(receiver: Any, tmp_path: Path) -> None:
    db = receiver.db
    job_id = _job_for_two_destinations(receiver, tmp_path)
    assert jobs.claim(db, job_id, NEW, 60).outcome is jobs.ClaimOutcome.CLAIMED
    recorded = jobs.record_outputs(db, job_id, NEW, _outputs(), summary={}, timings={}, lease_seconds=60)
    assert recorded is jobs.Recorded.DELIVERING
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.DELIVERING.value and job.lease_owner == NEW
        assert s.scalar(select(func.count()).select_from(Outbox).where(Outbox.job_id == job_id)) == 0
    # Nobody else may deliver while the lease lives; once it expires (the worker died), the
    # delivery queue's worker takes over.
    assert jobs.claim(db, job_id, "central:1", 60, delivery=True).outcome is jobs.ClaimOutcome.BUSY
    _expire(db, job_id)
    assert jobs.claim(db, job_id, "central:1", 60, delivery=True).outcome is jobs.ClaimOutcome.CLAIMED
    assert not jobs.record_attempt(db, job_id, NEW, jobs.open_deliveries(db, job_id)[0].id, DeliveryState.DONE, 1)


def test_result_store_api_refuses_a_worker_that_lost_its_lease(tmp_path: Path) -> None:
    token = "store-token"
    node = NodeProcess(
        tmp_path / "var",
        {
            "DICOM_NODE_STABLE_SECONDS": "1",
            "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0",
            "DICOM_NODE_HTTP__TOKENS": f'["{token}"]',
        },
    ).start()
    try:
        assert storescu(node.dicom_port, ct_series(tmp_path / "s", slices=4, size=32)).returncode == 0
        db = open_database(f"sqlite:///{tmp_path / 'var' / 'state.sqlite'}")
        (job_id,) = wait_until(
            lambda: [j.id for j in _jobs(db) if j.state == JobState.QUEUED.value], 30, message="a queued job"
        )
        assert jobs.claim(db, job_id, OLD, 60).outcome is jobs.ClaimOutcome.CLAIMED
        _expire(db, job_id)
        assert jobs.claim(db, job_id, NEW, 60).outcome is jobs.ClaimOutcome.CLAIMED

        base = f"http://127.0.0.1:{node.http_port}/api/jobs/{job_id}/results"
        data = b"\x00" * 128 + b"DICM" + b"result bytes"
        sha = hashlib.sha256(data).hexdigest()

        def put(name: str, owner: str, body: bytes = data, digest: str = sha, auth: bool = True) -> requests.Response:
            headers = {"X-Lease-Owner": owner, "X-Content-SHA256": digest}
            if auth:
                headers["Authorization"] = f"Bearer {token}"
            return requests.put(f"{base}/{name}", data=body, headers=headers, timeout=10)

        results = tmp_path / "var" / "results" / job_id
        assert put("sr.dcm", OLD).status_code == 409
        assert not (results / "sr.dcm").exists()
        assert put("sr.dcm", NEW, auth=False).status_code == 401
        # A name that tries to leave the job's folder never reaches the store.
        for name in ("../../etc.dcm", "..%2F..%2Fetc.dcm", ".sr.dcm", "SR.exe", "sr.dcm.part"):
            assert put(name, NEW).status_code in (400, 404, 405), name
        assert not (tmp_path / "var" / "etc.dcm").exists() and not (tmp_path / "etc.dcm").exists()
        assert put("sr.dcm", NEW, body=data + b"x").status_code == 400, "checksum mismatch must be refused"
        assert not (results / "sr.dcm").exists()
        missing = requests.put(
            f"http://127.0.0.1:{node.http_port}/api/jobs/00000000-0000-4000-8000-000000000000/results/sr.dcm",
            data=data,
            headers={"X-Lease-Owner": NEW, "X-Content-SHA256": sha, "Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert missing.status_code == 404
        ok = put("sr.dcm", NEW)
        assert ok.status_code == 201, ok.text
        assert ok.json() == {"name": "sr.dcm", "path": f"{job_id}/sr.dcm", "size": len(data), "sha256": sha}
        assert (results / "sr.dcm").read_bytes() == data
        assert [p.name for p in results.iterdir()] == ["sr.dcm"], "no temporary file may be left"
    finally:
        node.stop()


def _jobs(db: Any) -> list[Job]:
    with db.session() as s:
        return list(s.scalars(select(Job)))


def test_a_worker_that_puts_results_to_the_node_does_not_consume_delivery(tmp_path: Path) -> None:
    remote = NodeProcess(
        tmp_path / "var",
        {
            "DICOM_NODE_WORKER__SOURCE": "dicomweb",
            "DICOM_NODE_WORKER__NODE_URL": "http://127.0.0.1:9",
        },
    )
    (tmp_path / "var").mkdir()
    refused = remote.run("worker", "--queues", "gpu,delivery", timeout=60)
    assert refused.returncode == 2
    assert "delivery" in refused.stderr and "result store" in refused.stderr
