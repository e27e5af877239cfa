"""Re-running a study the node holds, for a new model version or a rule added since (issue 16,
item 3: "no backfill ... for a new model"), against a real listener and a real state database
(SQLite and PostgreSQL).

Workers publish what they run (``model_versions``); a study whose newest job for a rule and
model ran another version gets a job of the next generation, superseding it; a rule and model
with no job for the input set gets its first. Generation 0 keeps the ids jobs always had.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from dicom_node.backfill import Action, RemoteStudy, plan_studies
from dicom_node.completion import (
    NEW_RULE,
    NEW_VERSION,
    complete_due_studies,
    rerun_study,
    reruns_due,
)
from dicom_node.jobs import JobSpec, job_id_for, result_lineage
from dicom_node.settings import RouteRule
from dicom_node.state import (
    AuditEvent,
    Job,
    JobState,
    ModelVersion,
    Outbox,
    Output,
    Study,
    open_database,
    utcnow,
)
from dicom_node.state.model_versions import current_versions, publish
from tests.dicomgen import ct_series
from tests.peers import storescu

MODEL = "lung-nodules"  # what the default rule runs (dicom_node.settings.effective_routes)
NAMESPACE = uuid.UUID("6d1f2b1e-8f0c-4e0f-9d7a-3a7c1f4b2e11")  # dicom_node/jobs/lifecycle.py


def _send(receiver: Any, paths: list[Path]) -> None:
    run = storescu(receiver.server.server_address[1], paths, aet=receiver.settings.ae_title)
    assert run.returncode == 0, run.stderr


def _completed_study(receiver: Any, tmp_path: Path) -> tuple[list[Path], str]:
    """A CT study received and completed: its generation-0 job id."""
    files = ct_series(tmp_path / "study", slices=6, size=32)
    _send(receiver, files)
    created = complete_due_studies(
        receiver.db, receiver.settings, now=utcnow() + timedelta(seconds=60)
    )
    assert len(created) == 1
    return files, created[0]


def _finish(db: Any, job_id: str, version: str, *, with_results: bool = False) -> None:
    """What a worker records when it ran ``version`` (the results: one SR)."""
    now = utcnow()
    with db.session() as s:
        job = s.get(Job, job_id)
        job.state = JobState.DONE.value
        job.model_version = version
        job.finished_at = now
        if with_results:
            s.add(
                Output(
                    job_id=job_id,
                    kind="sr",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                    series_instance_uid=f"2.25.{uuid.uuid4().int}",
                    sop_instance_uid=f"2.25.{uuid.uuid4().int}",
                    path=f"{job_id}/sr.dcm",
                    size=1,
                    sha256="0" * 64,
                    created_at=now,
                )
            )


def test_generation_0_keeps_the_ids_jobs_always_had() -> None:
    args = ("1.2.3", "ab" * 32, "default-ct", MODEL)
    before = str(uuid.uuid5(NAMESPACE, "|".join(args)))  # the id of every job made so far
    assert job_id_for(*args) == job_id_for(*args, generation=0) == before
    spec = JobSpec(1, args[0], 1, args[1], 6, args[2], args[3], "cpu", 3)
    assert spec.job_id == before
    second = job_id_for(*args, generation=1)
    assert second != before and second == job_id_for(*args, generation=1)
    assert job_id_for(*args, generation=2) not in (before, second)


def test_workers_publish_what_they_run(database_url: str) -> None:
    db = open_database(database_url)
    try:
        assert current_versions(db) == {}
        t0 = utcnow()
        publish(db, "gpu-1", MODEL, "1.0.0", "a" * 64, now=t0)
        publish(db, "gpu-2", MODEL, "1.0.0", now=t0 + timedelta(seconds=1))
        publish(db, "gpu-1", MODEL, "2.0.0", "b" * 64, now=t0 + timedelta(seconds=2))
        with db.session() as s:
            rows = {
                (r.worker, r.version, r.weights_sha256) for r in s.scalars(select(ModelVersion))
            }
        assert rows == {("gpu-1", "2.0.0", "b" * 64), ("gpu-2", "1.0.0", None)}  # upserted
        assert current_versions(db) == {MODEL: "2.0.0"}  # the newest published
        publish(db, "gpu-2", MODEL, "1.0.0", now=t0 + timedelta(seconds=3))  # rolled back
        assert current_versions(db) == {MODEL: "1.0.0"}
    finally:
        db.dispose()


def test_a_new_model_version_reruns_the_study_and_supersedes_its_results(
    receiver: Any, tmp_path: Path
) -> None:
    db, settings = receiver.db, receiver.settings
    files, first = _completed_study(receiver, tmp_path)
    _finish(db, first, "1.0.0", with_results=True)
    # Sending the same instances again changes nothing: identical duplicates (dicom_node/ingest)
    # leave the study complete, so no job is made.
    _send(receiver, files)
    with db.session() as s:
        study = s.scalars(select(Study)).one()
        assert study.dirty is False and study.version == 1
        study_id, study_uid = study.id, study.study_instance_uid
    assert complete_due_studies(db, settings, now=utcnow() + timedelta(seconds=120)) == []

    publish(db, "w1", MODEL, "1.0.0")
    assert reruns_due(db, settings, study_id) == []  # the workers run what the job ran
    assert rerun_study(db, settings, study_id, reason="test") == []

    publish(db, "w1", MODEL, "2.0.0")  # a new version deployed: no job has run it yet
    (due,) = reruns_due(db, settings, study_id)
    assert (due.why, due.generation, due.supersedes_id) == (NEW_VERSION, 1, first)
    assert due.describe() == f"default-ct/{MODEL} 1.0.0 -> 2.0.0"

    created = rerun_study(db, settings, study_id, reason="test", actor="cli")
    with db.session() as s:
        old = s.get(Job, first)
        assert old is not None
        assert created == [job_id_for(study_uid, old.input_hash, "default-ct", MODEL, 1)]
        new = s.get(Job, created[0])
        assert new is not None
        assert (new.generation, new.supersedes_id, new.state) == (1, first, "waiting")
        assert (new.input_hash, new.study_version) == (old.input_hash, old.study_version)
        assert old.state == JobState.DONE.value  # kept: its results are withdrawn on delivery
        assert s.scalar(select(func.count()).select_from(Outbox).where(Outbox.job_id == new.id))
        rerun_audit = s.scalars(select(AuditEvent).where(AuditEvent.event == "study-rerun")).one()
        assert rerun_audit.actor == "cli" and rerun_audit.detail["jobs"] == 1
    lineage = result_lineage(db, created[0])
    assert lineage.version == 2 and lineage.superseded_job_id == first
    assert [r.kind for r in lineage.superseded] == ["sr"]

    assert rerun_study(db, settings, study_id, reason="again") == []  # one per version
    _finish(db, created[0], "2.0.0")
    assert reruns_due(db, settings, study_id) == []
    publish(db, "w1", MODEL, "3.0.0")
    (third,) = reruns_due(db, settings, study_id)
    assert (third.generation, third.supersedes_id) == (2, created[0])


def test_a_rule_added_since_gets_its_job(receiver: Any, tmp_path: Path, make_settings: Any) -> None:
    db = receiver.db
    _, first = _completed_study(receiver, tmp_path)
    _finish(db, first, "1.0.0")
    publish(db, "w1", MODEL, "1.0.0")
    with db.session() as s:
        study_id = s.scalars(select(Study.id)).one()
    assert reruns_due(db, receiver.settings, study_id) == []
    wider = make_settings(
        database_url=receiver.settings.database_url,
        routes=[
            RouteRule(name="default-ct", modality=["CT"], models=[MODEL]),
            RouteRule(name="ct-emphysema", modality=["CT"], models=["emphysema"]),
        ],
    )
    (due,) = reruns_due(db, wider, study_id)
    assert (due.rule, due.model, due.why, due.generation) == (
        "ct-emphysema",
        "emphysema",
        NEW_RULE,
        0,
    )
    (created,) = rerun_study(db, wider, study_id, reason="new rule")
    with db.session() as s:
        job = s.get(Job, created)
        assert job is not None and (job.rule, job.generation, job.supersedes_id) == (
            "ct-emphysema",
            0,
            None,
        )
    assert reruns_due(db, wider, study_id) == []


@pytest.mark.parametrize("rerun", [True, False])
def test_backfill_plan_says_done_rerun_or_stale(
    receiver: Any, tmp_path: Path, make_settings: Any, rerun: bool
) -> None:
    db, settings = receiver.db, receiver.settings
    _, first = _completed_study(receiver, tmp_path)
    with db.session() as s:
        uid = s.scalars(select(Study.study_instance_uid)).one()
    here = RemoteStudy(uid, "20261129", ("CT",), instances=6)
    elsewhere = RemoteStudy("1.2.3.4", "20261129", ("CT",), instances=3)

    def plan(cfg: Any) -> dict[str, tuple[Action, str]]:
        found = plan_studies(db, [here, elsewhere], lambda _uid: set(), cfg, rerun=rerun)
        return {p.remote.study_instance_uid: (p.action, p.reason) for p in found}

    assert plan(settings)[uid][0] is Action.IN_PROGRESS  # its job is waiting
    assert plan(settings)["1.2.3.4"] == (Action.PULL, "not at the node")
    _finish(db, first, "1.0.0")
    publish(db, "w1", MODEL, "1.0.0")
    assert plan(settings)[uid] == (Action.DONE, "jobs done")
    publish(db, "w1", MODEL, "2.0.0")
    assert plan(settings)[uid] == (
        Action.RERUN if rerun else Action.STALE,
        f"default-ct/{MODEL} 1.0.0 -> 2.0.0",
    )
    publish(db, "w1", MODEL, "1.0.0")
    wider = make_settings(
        database_url=settings.database_url,
        routes=[
            RouteRule(name="default-ct", modality=["CT"], models=[MODEL]),
            RouteRule(name="ct-emphysema", modality=["CT"], models=["emphysema"]),
        ],
    )
    assert plan(wider)[uid] == (
        Action.RERUN if rerun else Action.STALE,
        "ct-emphysema/emphysema: no job yet",
    )
