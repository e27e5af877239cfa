"""Finding a study by Study Instance UID, accession number or patient ID, on a real
``dicom-node serve``: studies sent over DICOM (DCMTK ``storescu``), the lookup keys filled by
the real ingest, and the lookup through the HTTP API, the CLI and the dashboard's search box
(headless Chromium). Identifiers are patient data: they are stored only as keyed hashes, never
reach the node's log, and every lookup is audited without them."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import sqlalchemy as sa

from dicom_node.state import AuditEvent, Database, Study, open_database
from dicom_node.study_lookup import STUDY_LOOKUP, LookupKind, lookup_key, study_condition
from tests.dicomgen import ct_series
from tests.peers import NodeProcess, storescu, wait_until

TOKEN = "lookup-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OPERATOR = "it-desk"
VIEWER_TOKEN = "lookup-test-viewer-token"
USER, PASSWORD = "front-desk", "lookup-test-password"

# Identifiers that appear nowhere else in the node's world (so a leak is unmistakable).
SCREENSHOTS = (
    Path(os.environ["DICOM_NODE_SCREENSHOTS"]) if os.environ.get("DICOM_NODE_SCREENSHOTS") else None
)
"""A folder the search page's screenshot is copied to (e.g. docs/screenshots), when set (read
at import: the suite's fixtures clear every ``DICOM_NODE_*`` variable)."""
ACCESSION_A, ACCESSION_B = "QZACC-7731", "QZACC-7732"
PATIENT = "QZPAT-55501"


def test_lookup_keys_are_keyed_normalized_and_kind_separated() -> None:
    key = lookup_key("secret-1", LookupKind.ACCESSION_NUMBER, ACCESSION_A)
    assert len(key) == 64 and ACCESSION_A not in key
    assert key == lookup_key("secret-1", LookupKind.ACCESSION_NUMBER, f" {ACCESSION_A} \x00")
    assert key != lookup_key("secret-2", LookupKind.ACCESSION_NUMBER, ACCESSION_A)
    assert key != lookup_key("secret-1", LookupKind.PATIENT_ID, ACCESSION_A)
    assert key != lookup_key("secret-1", LookupKind.ACCESSION_NUMBER, ACCESSION_A.lower())


def _series(
    out: Path, *, accession: str, patient_id: str, slices: int = 3
) -> tuple[str, list[Path]]:
    paths = ct_series(out, slices=slices, size=32, patient_id=patient_id)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = accession
        ds.save_as(path, enforce_file_format=True)
    return str(pydicom.dcmread(paths[0]).StudyInstanceUID), paths


def _start_node(tmp_path: Path, database_url: str) -> NodeProcess:
    """`dicom-node serve` with an embedded broker and no worker: jobs wait in `queued`."""
    return NodeProcess(
        tmp_path / "var",
        {
            "DICOM_NODE_DATABASE_URL": database_url,
            "DICOM_NODE_STABLE_SECONDS": "1",
            "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0",
            "DICOM_NODE_HTTP__TOKENS": json.dumps(
                [
                    {"name": OPERATOR, "token": TOKEN, "role": "operator"},
                    {"name": "ris", "token": VIEWER_TOKEN, "role": "viewer"},
                ]
            ),
            "DICOM_NODE_HTTP__USERS": json.dumps({USER: PASSWORD}),
        },
    ).start()


@pytest.fixture
def node(tmp_path: Path, database_url: str) -> Iterator[NodeProcess]:
    proc = _start_node(tmp_path, database_url)
    try:
        yield proc
    finally:
        proc.stop()


def _get(base: str, path: str, **params: str) -> requests.Response:
    return requests.get(base + path, params=params, headers=AUTH, timeout=10)


def _lookup_audits(url: str) -> list[AuditEvent]:
    db = Database(url)
    try:
        with db.session() as s:
            return list(
                s.scalars(
                    sa.select(AuditEvent)
                    .where(AuditEvent.event == STUDY_LOOKUP)
                    .order_by(AuditEvent.id)
                )
            )
    finally:
        db.dispose()


def _send_two_studies(node: NodeProcess, tmp_path: Path, base: str) -> tuple[str, str, list[Any]]:
    """Two studies of one patient, each with its own accession number; their queued jobs."""
    uid_a, paths_a = _series(tmp_path / "a", accession=ACCESSION_A, patient_id=PATIENT)
    uid_b, paths_b = _series(tmp_path / "b", accession=ACCESSION_B, patient_id=PATIENT)
    assert storescu(node.dicom_port, [*paths_a, *paths_b]).returncode == 0
    jobs = wait_until(
        lambda: (
            lambda js: js if len(js) == 2 and all(j["state"] == "queued" for j in js) else None
        )(_get(base, "/api/jobs").json()["jobs"]),
        60,
        message="two queued jobs (embedded broker, no worker)",
    )
    return uid_a, uid_b, jobs


def test_find_a_study_through_the_api_and_the_cli(
    node: NodeProcess, tmp_path: Path, database_url: str
) -> None:
    base = f"http://127.0.0.1:{node.http_port}"
    wait_until(lambda: _get(base, "/healthz").status_code == 200, 30, message="healthz")
    uid_a, uid_b, jobs = _send_two_studies(node, tmp_path, base)
    job_of = {j["study"]["study_instance_uid"]: j["id"] for j in jobs}
    assert set(job_of) == {uid_a, uid_b}  # the job list carries the Study Instance UID

    # Stored: keyed hashes only, filled by the real ingest; the identifiers themselves nowhere.
    db = open_database(database_url)
    try:
        with db.session() as s:
            studies = {st.study_instance_uid: st for st in s.scalars(sa.select(Study))}
        secret = db.salt
    finally:
        db.dispose()
    a = studies[uid_a]
    assert a.accession_number_hmac == lookup_key(secret, LookupKind.ACCESSION_NUMBER, ACCESSION_A)
    assert a.patient_id_hmac == lookup_key(secret, LookupKind.PATIENT_ID, PATIENT)
    assert studies[uid_b].patient_id_hmac == a.patient_id_hmac
    for st in studies.values():
        assert ACCESSION_A not in repr(vars(st)) and PATIENT not in repr(vars(st))

    # One identifier, each kind and each spelling of the parameters.
    found = _get(base, "/api/studies", accession=ACCESSION_A).json()
    assert found["by"] == "accession_number" and found["count"] == 1
    (job,) = found["jobs"]
    assert job["id"] == job_of[uid_a] and job["study"]["study_instance_uid"] == uid_a
    assert {"state", "model", "created_at", "findings"} <= set(job) and job["study"]["version"] == 1
    assert (
        _get(base, "/api/studies", accession_number=ACCESSION_B).json()["jobs"][0]["id"]
        == (job_of[uid_b])
    )
    by_patient = _get(base, "/api/studies", patient_id=PATIENT).json()
    assert {j["id"] for j in by_patient["jobs"]} == set(job_of.values())
    assert len(by_patient["studies"]) == 2
    for name in ("study_instance_uid", "study_uid"):
        assert [j["id"] for j in _get(base, "/api/studies", **{name: uid_b}).json()["jobs"]] == [
            job_of[uid_b]
        ]
    # Exact match only: no prefix, no other case.
    assert _get(base, "/api/studies", accession=ACCESSION_A[:-1]).json()["count"] == 0
    assert _get(base, "/api/studies", patient_id=PATIENT.lower()).json()["studies"] == []

    # Exactly one identifier; none keeps the older answer (studies being received).
    two = _get(base, "/api/studies", accession=ACCESSION_A, patient_id=PATIENT)
    assert two.status_code == 400 and ACCESSION_A not in two.text and PATIENT not in two.text
    assert (
        _get(base, "/api/studies", accession=ACCESSION_A, accession_number="x").status_code == 400
    )
    assert _get(base, "/api/studies", patient_id="  ").status_code == 400
    assert _get(base, "/api/studies", patient_id="x" * 65).status_code == 400
    assert "receiving" in _get(base, "/api/studies").json()
    assert (
        requests.get(base + "/api/studies", params={"patient_id": PATIENT}, timeout=10).status_code
        == 401
    )

    # A viewer may not search by identifier, nor see them in the job list (403 is audited).
    viewer = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
    refused = requests.get(
        base + "/api/studies", params={"accession": ACCESSION_A}, headers=viewer, timeout=10
    )
    assert refused.status_code == 403 and ACCESSION_A not in refused.text
    listed = requests.get(base + "/api/jobs", headers=viewer, timeout=10)
    assert listed.status_code == 200 and uid_a not in listed.text and uid_b not in listed.text

    # The operator who found the study by its accession number retries its job (cancelled
    # first: no worker runs here, so the job would otherwise stay queued).
    found_id = job_of[uid_a]
    post = lambda path: requests.post(base + path, headers=AUTH, timeout=10)  # noqa: E731
    assert post(f"/api/jobs/{found_id}/cancel").json()["applied"] is True
    retried = post(f"/api/jobs/{found_id}/retry")
    assert retried.status_code == 200 and retried.json()["applied"] is True
    db = Database(database_url)
    try:
        with db.session() as s:
            actions = [
                (e.actor, e.detail.get("action"))
                for e in s.scalars(
                    sa.select(AuditEvent).where(AuditEvent.event == "http-action").order_by(AuditEvent.id)
                )
            ]
    finally:
        db.dispose()
    assert actions == [(OPERATOR, "cancel"), (OPERATOR, "retry")]

    # The CLI, against the same database (audited as the CLI).
    out = node.run("jobs", "--patient", PATIENT, "--json")
    assert out.returncode == 0, out.stderr
    assert {j["id"] for j in json.loads(out.stdout)["jobs"]} == set(job_of.values())
    table = node.run("jobs", "--accession", ACCESSION_B)
    assert table.returncode == 0, table.stderr
    assert job_of[uid_b][:8] in table.stdout and job_of[uid_a][:8] not in table.stdout
    assert node.run("jobs", "--study", uid_a, "--json").stdout.count(job_of[uid_a]) == 1

    # Audited: one record per lookup, by kind and count, never the identifier.
    audits = _lookup_audits(database_url)
    assert [(e.detail["by"], e.detail["via"], e.detail["jobs"]) for e in audits] == [
        ("accession_number", "api", 1),
        ("accession_number", "api", 1),
        ("patient_id", "api", 2),
        ("study_instance_uid", "api", 1),
        ("study_instance_uid", "api", 1),
        ("accession_number", "api", 0),
        ("patient_id", "api", 0),
        ("patient_id", "cli", 2),
        ("accession_number", "cli", 1),
        ("study_instance_uid", "cli", 1),
    ]
    assert audits[0].actor and audits[0].study_key == studies[uid_a].study_key
    assert all(OPERATOR in (e.actor or "") for e in audits if e.detail["via"] == "api")
    assert audits[2].study_key is None  # two studies: no single key
    for event in audits:
        text = json.dumps(event.detail)
        assert ACCESSION_A not in text and ACCESSION_B not in text and PATIENT not in text

    # The identifiers never reached the node's log (the access log drops query strings).
    node.stop()
    log = node.log()
    assert ACCESSION_A not in log and ACCESSION_B not in log and PATIENT not in log
    assert "study-lookup" in log  # the audit lines are there, without them


def test_studies_from_before_the_lookup_keys_are_found_by_uid(tmp_path: Path) -> None:
    """A 0.1.0 database upgrades with NULL keys; its studies are still found by their UID."""
    target = tmp_path / "state.sqlite"
    shutil.copyfile(Path(__file__).parent / "fixtures" / "state-0.1.0.sqlite", target)
    db = open_database(f"sqlite:///{target}")
    try:
        secret = db.salt  # read first: a session holds SQLite's write lock
        with db.session() as s:
            studies = list(s.scalars(sa.select(Study)))
            assert studies and all(
                st.accession_number_hmac is None and st.patient_id_hmac is None for st in studies
            )
            uid = studies[0].study_instance_uid
            hit = s.scalars(
                sa.select(Study).where(study_condition(secret, LookupKind.STUDY_INSTANCE_UID, uid))
            ).one()
            assert hit.id == studies[0].id
    finally:
        db.dispose()


@pytest.mark.viewer
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dashboard_search_box_finds_the_jobs(tmp_path: Path, sqlite_url: str) -> None:
    """A user types an identifier in the search box, like at the front desk; the answer page
    lists the study's jobs, and the identifier is in no URL (a form post)."""
    from tests.viewer.assets import playwright_core
    from tests.viewer.browser import Browser

    playwright_core()
    node = _start_node(tmp_path, sqlite_url)
    browser = Browser(width=1280, height=800, http_credentials=(USER, PASSWORD))
    try:
        base = f"http://127.0.0.1:{node.http_port}"
        uid_a, uid_b, jobs = _send_two_studies(node, tmp_path, base)
        job_of = {j["study"]["study_instance_uid"]: j["id"] for j in jobs}
        browser.goto(base + "/")
        browser.wait("#study-search")

        def search(by: str, value: str) -> list[str]:
            browser.eval(
                f"""(() => {{ const f = document.getElementById('study-search');
                f.querySelector('select[name="by"]').value = {json.dumps(by)};
                f.querySelector('input[name="value"]').value = {json.dumps(value)}; }})()"""
            )
            browser.call("click", selector="#study-search button[type=submit]")
            browser.wait_for(
                "location.pathname === '/studies/search' && document.readyState === 'complete'"
            )
            browser.wait("#found-jobs, #search-error")
            assert value not in browser.eval("location.href")
            ids: list[str] = browser.eval(
                "Array.from(document.querySelectorAll('#found-jobs tbody tr[data-job-id]'), r => r.dataset.jobId)"
            )
            return ids

        assert search("accession_number", ACCESSION_A) == [job_of[uid_a]]
        shots = tmp_path / "screenshots"
        shots.mkdir()
        shot = browser.screenshot(shots / "study-search.png")
        if SCREENSHOTS is not None:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, SCREENSHOTS / shot.name)
        assert sorted(search("patient_id", PATIENT)) == sorted(job_of.values())
        assert browser.eval("document.getElementById('found-count').textContent").startswith(
            "2 study(ies), 2 job(s)"
        )
        # The answer page keeps the search box, with the kind chosen.
        assert browser.eval("document.querySelector('#study-search select').value") == "patient_id"
        assert search("study_instance_uid", uid_b) == [job_of[uid_b]]
        assert browser.eval("document.querySelector('#found-jobs .study-uid').textContent") == uid_b
        assert search("accession_number", "QZNOPE") == []
        assert "No study matches" in browser.eval(
            "document.getElementById('found-jobs').textContent"
        )
        # From a match to its job page.
        search("accession_number", ACCESSION_B)
        browser.call("click", selector="#found-jobs a")
        browser.wait("#job")
        assert browser.eval("document.getElementById('job').dataset.jobId") == job_of[uid_b]
        # (The harness injects a <style> into every page for OHIF; the node's CSP refuses it.)
        errors = [
            m
            for m in browser.console()
            if m["type"] in ("error", "pageerror") and "Applying inline style" not in m["text"]
        ]
        assert not errors, errors

        audits = _lookup_audits(sqlite_url)
        assert [(e.detail["via"], e.detail["by"], e.detail["jobs"]) for e in audits] == [
            ("dashboard", "accession_number", 1),
            ("dashboard", "patient_id", 2),
            ("dashboard", "study_instance_uid", 1),
            ("dashboard", "accession_number", 0),
            ("dashboard", "accession_number", 1),
        ]
        assert all(USER in (e.actor or "") for e in audits)
    finally:
        browser.close()
        node.stop()
    log = node.log()
    assert ACCESSION_A not in log and PATIENT not in log and "QZNOPE" not in log
