"""Superseding an earlier result set in the PACS (issue 16, item 2).

A late instance makes a study's results version 2; version 1 must stop being current in the
PACS. With a destination's ``supersede = "kos"`` (the default) the node sends an IHE IOCM
rejection note beside version 2 (a KOS titled (113001, DCM) "Rejected for Quality Reasons"
referencing exactly version 1's objects); with ``"delete"`` it deletes version 1 through
Orthanc's REST API; with ``"none"`` it leaves it. Version 2's SR names version 1's in its Predecessor Documents Sequence, and
its series number and description say the version.

The fast tests build the objects and the lineage directly; the end-to-end ones run a real node,
a real worker and a real Orthanc (DICOMweb) as the PACS.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydantic import ValidationError
from sqlalchemy import select

from dicom_node.jobs import JobSpec, ResultRef, create_job, result_lineage
from dicom_node.settings import DestinationSettings
from dicom_node.state import Job, JobState, Output, Study, open_database, utcnow
from tests import dicomgen
from tests.peers import Orthanc, RedisServer
from tests.pipeline_env import DEFAULT_CONFIG, NodeEnv
from tests.resultdata import detection, job_for, load_volume, read, sphere_finding
from workers.results import (
    KIND_KOS,
    KIND_SEG,
    KIND_SR,
    EncodeOptions,
    SourceFacts,
    encode_results,
    object_problems,
)
from workers.results.conformance import dciodvfy_available, run_dciodvfy

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def _require_dciodvfy() -> None:
    if not dciodvfy_available():
        pytest.skip("dciodvfy is not installed (Debian package dicom3tools)")


def _evidence_uids(kos: pydicom.Dataset) -> set[str]:
    return {
        str(r.ReferencedSOPInstanceUID)
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for r in series.ReferencedSOPSequence
    }


def _content_uids(kos: pydicom.Dataset) -> set[str]:
    return {
        str(r.ReferencedSOPInstanceUID)
        for item in kos.ContentSequence
        if item.ValueType in ("IMAGE", "COMPOSITE")
        for r in item.ReferencedSOPSequence
    }


def _predecessors(sr: pydicom.Dataset) -> set[str]:
    return {
        str(r.ReferencedSOPInstanceUID)
        for study in sr.get("PredecessorDocumentsSequence", [])
        for series in study.ReferencedSeriesSequence
        for r in series.ReferencedSOPSequence
    }


# -- the objects ---------------------------------------------------------------------------------


@pytest.fixture
def two_versions(tmp_path: Path) -> tuple[Any, Any, list[Any], list[Any]]:
    """Version 1 of a result, and version 2 (another input set) that supersedes it."""
    ct = load_volume(dicomgen.ct_series(tmp_path / "ct", slices=8, size=64))
    findings = [sphere_finding(ct, (3, 20, 20), 3.0)]
    job1 = job_for(ct)
    v1 = encode_results(ct, detection(ct, findings, job1.model), job1)
    refs = tuple(
        ResultRef(o.kind, o.sop_class_uid, o.series_instance_uid, o.sop_instance_uid) for o in v1
    )
    job2 = dataclasses.replace(
        job_for(ct, input_hash="1" * 64), result_version=2, superseded=refs
    )
    v2 = encode_results(ct, detection(ct, findings, job2.model), job2)
    return ct, job2, v1, v2


def test_version_2_rejects_version_1_with_an_iocm_note(two_versions: Any) -> None:
    _require_dciodvfy()
    _, _, v1, v2 = two_versions
    assert [o.kind for o in v1] == [KIND_SR, KIND_SEG]
    assert [o.kind for o in v2] == [KIND_SR, KIND_SEG, KIND_KOS]
    sr1, sr2, seg2, kos = read(v1[0].data), read(v2[0].data), read(v2[1].data), read(v2[2].data)
    assert kos.SOPClassUID == KOS_CLASS and kos.Modality == "KO"
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113001",
        "DCM",
        "Rejected for Quality Reasons",
    )
    assert kos.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    version_1 = {o.sop_instance_uid for o in v1}
    assert _evidence_uids(kos) == _content_uids(kos) == version_1
    assert kos.StudyInstanceUID == sr1.StudyInstanceUID
    assert kos.PatientID == sr1.PatientID and kos.PatientName == sr1.PatientName
    assert _predecessors(sr2) == {sr1.SOPInstanceUID}
    assert "PredecessorDocumentsSequence" not in sr1
    assert (sr1.SeriesNumber, sr2.SeriesNumber, seg2.SeriesNumber, kos.SeriesNumber) == (
        9001,
        9011,
        9012,
        9014,
    )
    assert sr1.SeriesDescription == "AI: lung-nodules (v1.2.0)"
    assert sr2.SeriesDescription == "AI: lung-nodules (v1.2.0), result 2"
    assert seg2.SeriesDescription.endswith("segmentation, result 2")
    for obj in v2:
        assert run_dciodvfy(obj.data).errors == [], obj.kind


def test_the_gate_refuses_a_note_that_misses_an_object(two_versions: Any) -> None:
    ct, job2, v1, v2 = two_versions
    kos = v2[2]
    facts = SourceFacts.from_volume(ct, job2)
    assert object_problems(kos, facts, job2) == []
    extra = ResultRef("seg", SEG_CLASS, "1.2.3.4", "1.2.3.4.5")
    more = dataclasses.replace(job2, superseded=(*job2.superseded, extra))
    problems = object_problems(kos, facts, more)
    assert "kos: content does not reference exactly the superseded objects" in problems
    assert "kos: evidence does not list exactly the superseded objects" in problems
    # An SR that should name its predecessor (version 1's SR read as version 2) is refused.
    assert any("Predecessor Documents" in p for p in object_problems(v1[0], facts, job2))


def test_a_first_version_has_no_note(two_versions: Any) -> None:
    ct, job2, _, _ = two_versions
    first = dataclasses.replace(job2, result_version=1, superseded=())
    findings = [sphere_finding(ct, (3, 20, 20), 3.0)]
    kinds = [o.kind for o in encode_results(ct, detection(ct, findings, first.model), first, EncodeOptions())]
    assert kinds == [KIND_SR, KIND_SEG]


# -- settings and lineage ------------------------------------------------------------------------


def test_delete_policy_needs_an_orthanc_rest_root() -> None:
    assert DestinationSettings(url="https://pacs.example/dicom-web").supersede == "kos"
    derived = DestinationSettings(url="http://u:p@127.0.0.1:8042/dicom-web/", supersede="delete")
    assert derived.orthanc_rest_url == "http://u:p@127.0.0.1:8042"
    with pytest.raises(ValidationError, match="needs orthanc_url"):
        DestinationSettings(url="dicom://ORTHANC@127.0.0.1:4242", supersede="delete")
    explicit = DestinationSettings(
        url="dicom://ORTHANC@127.0.0.1:4242", supersede="delete", orthanc_url="http://h:8042/"
    )
    assert explicit.orthanc_rest_url == "http://h:8042"
    with pytest.raises(ValidationError, match="supersede"):
        DestinationSettings(url="https://pacs.example/dicom-web", supersede="purge")  # type: ignore[arg-type]


def test_lineage_counts_versions_and_skips_a_version_without_results(sqlite_url: str) -> None:
    db = open_database(sqlite_url)
    now = utcnow()
    try:
        with db.session() as s:
            study = Study(
                study_key="0" * 32,
                study_instance_uid="1.2.3",
                first_received_at=now,
                last_received_at=now,
            )
            s.add(study)
            s.flush()
            ids: list[str] = []
            for version in (1, 2, 3):
                spec = JobSpec(
                    study_id=study.id,
                    study_instance_uid="1.2.3",
                    study_version=version,
                    input_hash=f"{version:064x}",
                    input_count=version,
                    rule="ct",
                    model="test-slow",
                    queue="cpu",
                    max_attempts=1,
                    supersedes_id=ids[-1] if ids else None,
                )
                job_id = create_job(s, spec, now)
                assert job_id is not None
                ids.append(job_id)
            # Version 1 recorded an SR, a SEG and its summary; version 2 was skipped (none).
            for n, (kind, cls) in enumerate((("sr", SR_CLASS), ("seg", SEG_CLASS), ("summary", None))):
                s.add(
                    Output(
                        job_id=ids[0],
                        kind=kind,
                        sop_class_uid=cls,
                        sop_instance_uid=f"1.2.3.9.{n}" if cls else None,
                        series_instance_uid=f"1.2.3.8.{n}" if cls else None,
                        path=f"{ids[0]}/{kind}",
                        size=1,
                        sha256="0" * 64,
                        created_at=now,
                    )
                )
        first, third = result_lineage(db, ids[0]), result_lineage(db, ids[2])
        assert (first.version, first.superseded) == (1, ())
        assert third.version == 3 and third.superseded_job_id == ids[0]
        assert [r.kind for r in third.superseded] == ["sr", "seg"]
        assert result_lineage(db, ids[1]).superseded_job_id == ids[0]
    finally:
        db.dispose()


# -- end to end: node, worker, Orthanc -----------------------------------------------------------


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "pacs").start()
    yield server
    server.stop()


def _instances(pacs: Orthanc, study_uid: str) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of every instance QIDO-RS lists in the study."""
    return {
        i["00080018"]["Value"][0]: i["00080016"]["Value"][0]
        for i in pacs.instances_in_study(study_uid)
    }


def _fetch(pacs: Orthanc, sop_instance_uid: str) -> bytes:
    (found,) = pacs.post("/tools/lookup", data=sop_instance_uid).json()
    return pacs.get(f"/instances/{found['ID']}/file").content


def _results(env: NodeEnv, job_id: str) -> dict[str, str]:
    """kind -> SOP Instance UID of a job's recorded result objects."""
    with env.db.session() as s:
        rows = s.scalars(select(Output).where(Output.job_id == job_id, Output.kind != "summary"))
        return {o.kind: str(o.sop_instance_uid) for o in rows}


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["kos", "delete", "none"])
def test_a_late_instance_leaves_one_current_result_set_in_orthanc(
    tmp_path: Path, sqlite_url: str, redis_server: RedisServer, pacs: Orthanc, policy: str
) -> None:
    _require_dciodvfy()
    config = DEFAULT_CONFIG.format(seconds=0.0) + "\n[destinations.pacs]\n" + "".join(
        f"{k} = {json.dumps(v)}\n"
        for k, v in {"url": pacs.dicomweb_url_with_credentials, "supersede": policy}.items()
    )
    env = NodeEnv(tmp_path / "node", sqlite_url, broker_url=redis_server.url, config_text=config)
    env.start()
    try:
        env.add_worker()
        study = dicomgen.ct_series(tmp_path / "ct", slices=8, size=64)
        study_uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
        env.send(study[:7])
        (v1_job,) = env.wait_all_terminal(1)
        assert v1_job.state == JobState.DONE.value, env.diagnostics()
        v1 = _results(env, v1_job.id)
        assert set(v1) == {"sr", "seg"}
        assert set(_instances(pacs, study_uid)) == set(v1.values())

        env.send(study[7:])  # a late slice: the study completes again, as version 2
        jobs = env.wait_all_terminal(2)
        assert [j.state for j in jobs] == [JobState.DONE.value] * 2, env.diagnostics()
        v2_job = jobs[1]
        assert v2_job.supersedes_id == v1_job.id
        v2 = _results(env, v2_job.id)
        assert set(v2) == {"sr", "seg", "kos"}
        held = _instances(pacs, study_uid)
        if policy == "kos":
            # Version 1 stays (an IOCM PACS hides it), version 2 beside it, one rejection note.
            assert set(held) == {v1["sr"], v1["seg"], v2["sr"], v2["seg"], v2["kos"]}
            kos_bytes = _fetch(pacs, v2["kos"])
            kos = pydicom.dcmread(io.BytesIO(kos_bytes))
            assert held[v2["kos"]] == KOS_CLASS
            title = kos.ConceptNameCodeSequence[0]
            assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
            assert _evidence_uids(kos) == _content_uids(kos) == set(v1.values())
            assert run_dciodvfy(kos_bytes).errors == []
        elif policy == "delete":
            # QIDO-RS shows exactly one current result set: version 2's SR and SEG.
            assert set(held) == {v2["sr"], v2["seg"]}
            assert sorted(held.values()) == sorted([SR_CLASS, SEG_CLASS])
        else:
            # Left as they are: both versions, no rejection note (it is recorded, not sent).
            assert set(held) == {v1["sr"], v1["seg"], v2["sr"], v2["seg"]}
        sr2 = pydicom.dcmread(io.BytesIO(_fetch(pacs, v2["sr"])))
        assert _predecessors(sr2) == {v1["sr"]}
        assert (sr2.SeriesNumber, sr2.SeriesDescription) == (9011, "AI: test-slow (v1.0.0), result 2")
        with env.db.session() as s:
            assert s.get(Job, v2_job.id).reason is None  # type: ignore[union-attr]
        env.assert_every_complete_study_terminal()
    finally:
        env.stop()
