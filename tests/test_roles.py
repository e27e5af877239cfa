"""Roles on the real HTTP API (``HttpServer``, the uvicorn component of ``dicom-node serve``, on
127.0.0.1): named tokens and users with roles, each role allowed what :data:`GRANTS` says and
refused (403, audited with the caller's name) the rest; plain tokens and users as before roles
are admins; every route declares its role; the settings forms of tokens and users."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from fastapi.routing import APIRoute, iter_route_contexts
from sqlalchemy import select

from dicom_node.api.app import create_app
from dicom_node.api.auth import GRANTS, require_role
from dicom_node.api.server import HttpServer
from dicom_node.errors import ConfigError
from dicom_node.settings import HttpToken, HttpUser, Settings, load_settings
from dicom_node.state import AuditEvent, Database, Job, JobState, Study, open_database, utcnow
from tests.dicomgen import ct_series
from tests.peers import free_port
from tests.test_stow import MULTIPART, multipart

SECRETS = {
    "viewer": "tok-viewer-5d1e-secret",
    "operator": "tok-operator-77aa-secret",
    "admin": "tok-admin-0c3b-secret",
    "sender": "tok-sender-91f0-secret",
    "worker": "tok-worker-e2d4-secret",
}
NAMES = {"viewer": "ris", "operator": "it-desk", "admin": "pacs-admin", "sender": "pacs", "worker": "gpu-1"}
PLAIN_TOKEN = "tok-plain-4b6c-secret"
READER, READER_PW = "dr-jones", "pw-reader-secret"
LEGACY, LEGACY_PW = "old-admin", "pw-legacy-secret"
JOB_ID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


class Node:
    def __init__(self, server: HttpServer, db: Database) -> None:
        self.server, self.db = server, db
        self.base = f"http://127.0.0.1:{server.settings.http_port}"

    def get(self, path: str, who: str, **kw: Any) -> requests.Response:
        return requests.get(self.base + path, headers={**bearer(who), **kw.pop("headers", {})}, timeout=10, **kw)

    def post(self, path: str, who: str, **kw: Any) -> requests.Response:
        return requests.post(self.base + path, headers={**bearer(who), **kw.pop("headers", {})}, timeout=30, **kw)

    def events(self, event: str) -> list[AuditEvent]:
        with self.db.session() as s:
            return list(s.scalars(select(AuditEvent).where(AuditEvent.event == event).order_by(AuditEvent.id)))


def bearer(who: str) -> dict[str, str]:
    token = SECRETS.get(who, who)
    return {"Authorization": f"Bearer {token}"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@contextmanager
def serve(tmp_path: Path, **settings: Any) -> Iterator[Node]:
    """A started HttpServer with the given settings, on a free loopback port."""
    s = Settings(data_dir=tmp_path, http_port=free_port(), **settings)
    s.spool_dir.mkdir(parents=True, exist_ok=True)
    db = open_database(s.resolved_database_url)
    server = HttpServer(s, db)
    server.start()
    try:
        yield Node(server, db)
    finally:
        server.stop()
        from dicom_node.api.routes.audit import close_exporter

        close_exporter(server.app)
        db.dispose()


def role_http() -> dict[str, Any]:
    return {
        "tokens": [
            *({"name": NAMES[role], "token": SECRETS[role], "role": role} for role in SECRETS),
            PLAIN_TOKEN,
        ],
        "users": {READER: {"password": READER_PW, "role": "viewer"}, LEGACY: LEGACY_PW},
        "login_failures": 1000,
    }


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with serve(tmp_path_factory.mktemp("roles"), http=role_http()) as n:
        yield n


def _stow(node: Node, who: str, tmp: Path) -> requests.Response:
    paths = ct_series(tmp, slices=2, size=16)
    body = multipart([p.read_bytes() for p in paths])
    return node.post(
        "/dicom-web/studies",
        who,
        data=body,
        headers={"Content-Type": MULTIPART, "Accept": "application/dicom+json"},
    )


def _add_done_job(db: Database) -> str:
    now = utcnow()
    with db.session() as s:
        study = s.scalars(select(Study)).first()
        assert study is not None
        s.add(
            Job(
                id=JOB_ID,
                study_id=study.id,
                study_version=1,
                rule="ct",
                model="m",
                state=JobState.DONE.value,
                input_hash="1" * 64,
                created_at=now,
                updated_at=now,
                finished_at=now,
            )
        )
        return str(study.study_instance_uid)


def test_each_role_may_do_its_part_and_nothing_more(node: Node, tmp_path: Path) -> None:
    # STOW-RS: senders and operators store; a viewer or a worker may not.
    assert _stow(node, "viewer", tmp_path / "v").status_code == 403
    assert _stow(node, "worker", tmp_path / "w").status_code == 403
    assert _stow(node, "sender", tmp_path / "s").status_code == 200
    study_uid = _add_done_job(node.db)

    # A sender stores and reads nothing; the job list is for people.
    assert node.get("/api/jobs", "sender").status_code == 403
    assert node.get(f"/dicom-web/studies/{study_uid}/metadata", "sender").status_code == 403
    # A worker reads DICOMweb (its inputs) but not the dashboard or the job list.
    wado = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    assert node.get(f"/dicom-web/studies/{study_uid}", "worker", headers=wado).status_code == 200
    assert node.get("/api/jobs", "worker").status_code == 403
    assert node.get("/", "worker").status_code == 403
    # ... and puts result files: past the role check, the lease check answers (job not running).
    put = requests.put(
        f"{node.base}/api/jobs/{JOB_ID}/results/seg.dcm",
        data=b"x",
        headers={**bearer("worker"), "X-Lease-Owner": "w", "X-Content-SHA256": "0" * 64},
        timeout=10,
    )
    assert put.status_code == 409, put.text
    put_as_viewer = requests.put(
        f"{node.base}/api/jobs/{JOB_ID}/results/seg.dcm",
        data=b"x",
        headers={**bearer("viewer"), "X-Lease-Owner": "w", "X-Content-SHA256": "0" * 64},
        timeout=10,
    )
    assert put_as_viewer.status_code == 403

    # A viewer reads jobs, pages and previews without identifiers: no Study Instance UID in the
    # job list, the job or its page, no DICOMweb, no search by identifier; and may not retry,
    # cancel or audit.
    for path in ("/api/jobs", f"/api/jobs/{JOB_ID}", "/", f"/jobs/{JOB_ID}", f"/api/jobs/{JOB_ID}/preview.png"):
        seen = node.get(path, "viewer")
        assert seen.status_code == 200, path
        assert study_uid not in seen.text, path
    assert 'id="study-search"' not in node.get("/", "viewer").text
    assert node.get(f"/dicom-web/studies/{study_uid}/metadata", "viewer").status_code == 403
    assert node.get(f"/api/studies?study_uid={study_uid}", "viewer").status_code == 403
    assert node.get("/api/studies", "viewer").status_code == 200  # studies being received: keys only
    # An operator sees them, and searches by them.
    assert study_uid in node.get(f"/api/jobs/{JOB_ID}", "operator").text
    assert study_uid in node.get(f"/jobs/{JOB_ID}", "operator").text
    assert 'id="study-search"' in node.get("/", "operator").text
    found = node.get(f"/api/studies?study_uid={study_uid}", "operator")
    assert found.status_code == 200 and [j["id"] for j in found.json()["jobs"]] == [JOB_ID]
    assert node.get(f"/dicom-web/studies/{study_uid}/metadata", "operator").status_code == 200
    refused = node.post(f"/api/jobs/{JOB_ID}/retry", "viewer")
    assert refused.status_code == 403 and "operator" in refused.json()["detail"]
    assert node.post(f"/api/jobs/{JOB_ID}/cancel", "viewer").status_code == 403
    assert node.get("/api/audit", "viewer").status_code == 403
    # The job page offers a viewer no buttons it could not use.
    page = node.get(f"/jobs/{JOB_ID}", "viewer").text
    assert 'id="retry"' not in page

    # An operator retries; the audit trail names them. An operator does not read the audit.
    page = node.get(f"/jobs/{JOB_ID}", "operator").text
    assert 'id="retry"' in page
    done = node.post(f"/api/jobs/{JOB_ID}/retry", "operator")
    assert done.status_code == 200 and done.json()["applied"] is True
    assert node.get("/api/audit", "operator").status_code == 403

    # An admin reads the audit trail: every actor by name, never a token.
    trail = node.get("/api/audit?limit=1000", "admin")
    assert trail.status_code == 200
    events = trail.json()["events"]
    actions = [(e["actor"], e["detail"]["action"]) for e in events if e["event"] == "http-action"]
    assert actions == [("it-desk", "retry")]
    denied = [e for e in events if e["event"] == "access-denied"]
    assert {e["actor"].split("@")[0] for e in denied} == {"http:ris", "http:gpu-1", "http:pacs", "http:it-desk"}
    assert all("{" in e["detail"]["route"] for e in denied if "studies/" in e["detail"]["route"])
    received = [e for e in events if e["event"] == "study-received"]
    assert [e["actor"].split("@")[0] for e in received] == ["http:pacs"]
    reads = [(e["actor"].split("@")[0], e["detail"]["what"]) for e in events if e["event"] == "phi-read"]
    assert ("http:gpu-1", "wado-rs") in reads and ("http:it-desk", "wado-rs-metadata") in reads
    assert ("http:ris", "preview") in reads
    assert all(e["study_key"] for e in events if e["event"] == "phi-read")
    text = json.dumps(events)
    assert study_uid not in text and not any(secret in text for secret in SECRETS.values())
    assert '"token"' not in text  # no shared actor any more

    # Reading the audit is itself audited, by name.
    assert [(e.actor or "").split("@")[0] for e in node.events("audit-read")][-1] == "http:pacs-admin"


def test_plain_tokens_and_users_are_admins_and_named(node: Node) -> None:
    # A plain token (as before roles) is an admin, named by its position in the list.
    r = node.get("/api/audit?event=audit-read", PLAIN_TOKEN)
    assert r.status_code == 200
    assert node.events("audit-read")[-1].actor == "http:token-6@127.0.0.1"
    legacy = requests.get(node.base + "/api/audit", headers=basic(LEGACY, LEGACY_PW), timeout=10)
    assert legacy.status_code == 200
    reader = requests.get(node.base + "/api/jobs", headers=basic(READER, READER_PW), timeout=10)
    assert reader.status_code == 200
    no = requests.post(node.base + f"/api/jobs/{JOB_ID}/cancel", headers=basic(READER, READER_PW), timeout=10)
    assert no.status_code == 403
    assert requests.get(node.base + "/api/jobs", headers=basic(READER, "wrong"), timeout=10).status_code == 401


def test_the_audit_api_pages_without_gaps(node: Node) -> None:
    first = node.get("/api/audit?limit=2&after=0", "admin").json()["events"]
    assert len(first) == 2 and first[0]["id"] < first[1]["id"]
    after = node.get(f"/api/audit?limit=2&after={first[1]['id']}", "admin").json()["events"]
    assert after and after[0]["id"] > first[1]["id"]
    since = node.get("/api/audit", "admin", params={"since": first[0]["at"], "limit": 1}).json()["events"]
    assert since[0]["id"] == first[0]["id"]
    only = node.get("/api/audit?event=access-denied", "admin").json()["events"]
    assert only and {e["event"] for e in only} == {"access-denied"}
    assert node.get("/api/audit?limit=0", "admin").status_code == 422


def test_every_route_declares_a_role(tmp_path: Path) -> None:
    settings = Settings.model_validate({"data_dir": tmp_path, "http": {"tokens": ["t"]}})
    db = open_database(settings.resolved_database_url)
    try:
        app = create_app(settings, db)
    finally:
        db.dispose()

    def needs(dependant: Any) -> set[str]:
        out = set()
        for dep in dependant.dependencies:
            name = getattr(dep.call, "__name__", "")
            if name.startswith("require_"):
                out.add(name)
            out |= needs(dep)
        return out

    undeclared, roles = [], {}
    for ctx in iter_route_contexts(app.routes):
        route = ctx.route
        if not isinstance(route, APIRoute) or ctx.path == "/healthz":
            continue
        found = needs(route.dependant)
        if not found:
            undeclared.append(ctx.path)
        roles[(ctx.path, tuple(sorted(ctx.methods or ())))] = found
    assert undeclared == []
    assert roles[("/api/jobs/{job_id}/retry", ("POST",))] == {"require_operator"}
    assert roles[("/api/jobs/{job_id}/cancel", ("POST",))] == {"require_operator"}
    assert roles[("/api/audit", ("GET",))] == {"require_admin"}
    assert roles[("/api/jobs", ("GET",))] == {"require_viewer"}
    assert roles[("/dicom-web/studies", ("POST",))] == {"require_operator_or_sender"}
    assert roles[("/dicom-web/studies/{study}", ("GET",))] == {"require_operator_or_worker"}
    assert roles[("/api/jobs/{job_id}/results/{name}", ("PUT",))] == {"require_worker"}


def test_grants() -> None:
    assert GRANTS["admin"] >= set(GRANTS)  # an admin stands in for every role
    assert "operator" not in GRANTS["viewer"] and "viewer" not in GRANTS["sender"]
    with pytest.raises(ValueError, match="roles must be"):
        require_role("superuser")  # type: ignore[arg-type]


# -- settings forms -----------------------------------------------------------------------------


def test_tokens_and_users_in_the_toml_file(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        "[[http.tokens]]\n"
        'name = "ris"\ntoken = "s3cret-ris"\nrole = "viewer"\n\n'
        "[[http.tokens]]\n"
        'name = "gpu-1"\ntoken = "s3cret-gpu"\nrole = "worker"\n\n'
        "[http.users]\n"
        'old = "s3cret-old"\n\n'
        "[http.users.alice]\n"
        'password = "s3cret-alice"\nrole = "operator"\n'
    )
    s = load_settings(cfg)
    ris, gpu = s.http.tokens
    assert isinstance(ris, HttpToken) and (ris.name, ris.role) == ("ris", "viewer")
    assert isinstance(gpu, HttpToken) and gpu.role == "worker"
    alice = s.http.users["alice"]
    assert isinstance(alice, HttpUser) and alice.role == "operator"
    assert s.http.users["old"].get_secret_value() == "s3cret-old"  # type: ignore[union-attr]
    # masked wherever settings are shown
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.model_dump())


def test_tokens_with_roles_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "DICOM_NODE_HTTP__TOKENS",
        json.dumps([{"name": "ris", "token": "s3cret-ris", "role": "viewer"}, "s3cret-plain"]),
    )
    monkeypatch.setenv("DICOM_NODE_HTTP__USERS", json.dumps({"alice": {"password": "s3cret-a", "role": "admin"}}))
    s = load_settings()
    assert isinstance(s.http.tokens[0], HttpToken) and s.http.tokens[0].role == "viewer"
    assert s.http.tokens[1].get_secret_value() == "s3cret-plain"  # type: ignore[union-attr]
    assert isinstance(s.http.users["alice"], HttpUser)
    # The plain forms still read as before roles.
    monkeypatch.setenv("DICOM_NODE_HTTP__TOKENS", "tok1,tok2")
    monkeypatch.setenv("DICOM_NODE_HTTP__USERS", "alice:pw1,bob:pw2")
    s = load_settings()
    assert [t.get_secret_value() for t in s.http.tokens] == ["tok1", "tok2"]  # type: ignore[union-attr]
    assert set(s.http.users) == {"alice", "bob"}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ([{"name": "ris", "token": "s3cret-x", "role": "superuser"}], "http.tokens"),
        ([{"name": "a", "token": "s3cret-1"}, {"name": "a", "token": "s3cret-2"}], "unique"),
        ([{"name": "has space", "token": "s3cret-x"}], "http.tokens"),
        ([{"name": "ris", "token": "  "}], "http.tokens"),
    ],
)
def test_bad_token_tables_are_explained_without_the_secret(
    monkeypatch: pytest.MonkeyPatch, value: Any, reason: str
) -> None:
    monkeypatch.setenv("DICOM_NODE_HTTP__TOKENS", json.dumps(value))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert reason in str(info.value) and "s3cret" not in str(info.value)
