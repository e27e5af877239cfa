"""Study completion and job creation against a real listener and a real state database
(SQLite and PostgreSQL): the quiet period, studies over several associations, late instances,
and the job claim/lease rules that make duplicate messages harmless."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from dicom_node import jobs as jobstate
from dicom_node.completion import complete_due_studies
from dicom_node.state import Job, JobState, Outbox, Study, utcnow
from tests.dicomgen import ct_series
from tests.peers import storescu


def _send(receiver: Any, paths: list[Path]) -> None:
    port = receiver.server.server_address[1]
    run = storescu(port, paths, aet=receiver.settings.ae_title)
    assert run.returncode == 0, run.stderr


def _later(seconds: float = 60.0) -> Any:
    return utcnow() + timedelta(seconds=seconds)


def test_study_becomes_one_job_after_the_quiet_period(receiver: Any, tmp_path: Path) -> None:
    files = ct_series(tmp_path / "study", slices=6, size=32)
    _send(receiver, files)
    db, settings = receiver.db, receiver.settings
    # Inside the quiet period nothing happens.
    assert complete_due_studies(db, settings, now=utcnow()) == []
    created = complete_due_studies(db, settings, now=_later())
    assert len(created) == 1
    # A second pass creates nothing more.
    assert complete_due_studies(db, settings, now=_later(120)) == []
    with db.session() as s:
        job = s.get(Job, created[0])
        assert job is not None
        assert job.state == JobState.WAITING.value
        assert job.model == "lung-nodules" and job.rule == "default-ct"
        assert job.input_count == 6
        assert s.scalar(select(func.count()).select_from(Outbox).where(Outbox.job_id == job.id)) == 1
        study = s.get(Study, job.study_id)
        assert study is not None and not study.dirty and study.version == 1


def test_two_associations_inside_the_quiet_period_are_one_job(receiver: Any, tmp_path: Path) -> None:
    files = ct_series(tmp_path / "study", slices=8, size=32)
    _send(receiver, files[:4])
    _send(receiver, files[4:])
    created = complete_due_studies(receiver.db, receiver.settings, now=_later())
    assert len(created) == 1
    with receiver.db.session() as s:
        assert s.get(Job, created[0]).input_count == 8  # type: ignore[union-attr]


def test_late_instance_creates_a_second_job_version(receiver: Any, tmp_path: Path) -> None:
    files = ct_series(tmp_path / "study", slices=8, size=32)
    _send(receiver, files[:6])
    first = complete_due_studies(receiver.db, receiver.settings, now=_later())
    _send(receiver, files[6:])
    second = complete_due_studies(receiver.db, receiver.settings, now=_later())
    assert len(first) == 1 and len(second) == 1 and first != second
    with receiver.db.session() as s:
        old, new = s.get(Job, first[0]), s.get(Job, second[0])
        assert old is not None and new is not None
        assert new.supersedes_id == old.id
        assert (old.study_version, new.study_version) == (1, 2)
        assert (old.input_count, new.input_count) == (6, 8)
        assert old.input_hash != new.input_hash
        # Version 1 had no results yet: it is cancelled, so it can never deliver stale ones.
        assert old.state == JobState.CANCELLED.value
        assert old.reason == jobstate.SUPERSEDED_UNFINISHED
        assert new.state == JobState.WAITING.value
        assert s.scalar(select(func.count()).select_from(Outbox).where(Outbox.job_id == old.id)) == 0


def test_a_running_older_version_records_nothing_once_superseded(receiver: Any, tmp_path: Path) -> None:
    """The race of a late instance with a worker still running version 1: version 2 looks for
    the result set it supersedes when it encodes, so version 1's results, recorded after that,
    would stay current in the PACS. Version 1 is cancelled instead and loses its lease; a
    version that already recorded its results (``delivering``) is left to be withdrawn."""
    files = ct_series(tmp_path / "study", slices=9, size=32)
    db, settings = receiver.db, receiver.settings
    _send(receiver, files[:6])
    (first,) = complete_due_studies(db, settings, now=_later())
    assert jobstate.claim(db, first, "worker-a", 60).outcome == jobstate.ClaimOutcome.CLAIMED
    _send(receiver, files[6:8])
    (second,) = complete_due_studies(db, settings, now=_later())
    recorded = jobstate.record_outputs(db, first, "worker-a", [], summary={}, timings={})
    assert recorded == jobstate.Recorded.LEASE_LOST
    with db.session() as s:
        old = s.get(Job, first)
        assert old is not None and old.state == JobState.CANCELLED.value
    # Version 2 recorded its results and is delivering when version 3 arrives: it stays.
    assert jobstate.claim(db, second, "worker-b", 60).outcome == jobstate.ClaimOutcome.CLAIMED
    assert jobstate.record_outputs(db, second, "worker-b", [], summary={}, timings={}) != jobstate.Recorded.LEASE_LOST
    _send(receiver, files[8:])
    (third,) = complete_due_studies(db, settings, now=_later())
    with db.session() as s:
        kept, newest = s.get(Job, second), s.get(Job, third)
        assert kept is not None and newest is not None
        assert kept.state in (JobState.DELIVERING.value, JobState.DONE.value)
        assert newest.supersedes_id == second


def test_interleaved_studies_complete_separately(receiver: Any, tmp_path: Path) -> None:
    a = ct_series(tmp_path / "a", slices=4, size=32)
    b = ct_series(tmp_path / "b", slices=4, size=32)
    _send(receiver, [x for pair in zip(a, b, strict=True) for x in pair])  # one association, two studies
    created = complete_due_studies(receiver.db, receiver.settings, now=_later())
    assert len(created) == 2
    with receiver.db.session() as s:
        assert sorted(s.get(Job, j).input_count for j in created) == [4, 4]  # type: ignore[union-attr]


def test_no_rule_matched_is_recorded_as_skipped(make_settings: Any, database_url: str, tmp_path: Path) -> None:
    from dicom_node.scp.server import Receiver
    from dicom_node.state import open_database

    settings = make_settings(database_url=database_url, routes=[{"name": "mr", "modality": ["MR"]}])
    db = open_database(database_url)
    rcv = Receiver(settings, db, reuse_port=False)
    rcv.start()
    try:
        _send(rcv, ct_series(tmp_path / "s", slices=4, size=32))
        created = complete_due_studies(db, settings, now=_later())
    finally:
        rcv.stop(grace=1)
    with db.session() as s:
        job = s.get(Job, created[0])
        assert job is not None and job.state == JobState.SKIPPED.value
        assert job.reason and "no routing rule matched" in job.reason and "modality CT not in ['MR']" in job.reason
        assert s.scalar(select(func.count()).select_from(Outbox)) == 0


def test_claim_lease_and_attempt_rules(receiver: Any, tmp_path: Path) -> None:
    _send(receiver, ct_series(tmp_path / "s", slices=4, size=32))
    (job_id,) = complete_due_studies(receiver.db, receiver.settings, now=_later())
    db = receiver.db
    first = jobstate.claim(db, job_id, "w1:1", lease_seconds=60)
    assert first.outcome is jobstate.ClaimOutcome.CLAIMED and first.attempt == 1
    # A second delivery of the same job while the lease is alive does nothing.
    assert jobstate.claim(db, job_id, "w2:2", lease_seconds=60).outcome is jobstate.ClaimOutcome.BUSY
    assert jobstate.renew(db, job_id, "w1:1", 60)
    assert not jobstate.renew(db, job_id, "w2:2", 60)
    # The holder dies: once its lease has expired another worker takes over, as attempt 2.
    with db.session() as s:
        s.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)  # type: ignore[union-attr]
    second = jobstate.claim(db, job_id, "w2:2", lease_seconds=60)
    assert second.outcome is jobstate.ClaimOutcome.CLAIMED and second.attempt == 2
    assert not jobstate.renew(db, job_id, "w1:1", 60), "the dead holder must not get the job back"
    assert jobstate.finish(db, job_id, "w2:2", JobState.DONE)
    # Finished: any later delivery is dropped.
    assert jobstate.claim(db, job_id, "w3:3", lease_seconds=60).outcome is jobstate.ClaimOutcome.FINISHED


def test_a_job_that_keeps_losing_its_worker_fails_after_max_attempts(receiver: Any, tmp_path: Path) -> None:
    _send(receiver, ct_series(tmp_path / "s", slices=4, size=32))
    (job_id,) = complete_due_studies(receiver.db, receiver.settings, now=_later())
    db = receiver.db
    max_attempts = receiver.settings.worker.max_attempts
    for attempt in range(1, max_attempts + 1):
        claim = jobstate.claim(db, job_id, f"w:{attempt}", lease_seconds=60)
        assert claim.outcome is jobstate.ClaimOutcome.CLAIMED and claim.attempt == attempt
        with db.session() as s:  # the worker dies holding the lease
            s.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)  # type: ignore[union-attr]
    last = jobstate.claim(db, job_id, "w:final", lease_seconds=60)
    assert last.outcome is jobstate.ClaimOutcome.EXHAUSTED
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.FAILED.value
        assert f"gave up after {max_attempts} attempts" in (job.reason or "")
        assert "worker was lost" in (job.reason or "")
