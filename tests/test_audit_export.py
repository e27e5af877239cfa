"""The audit trail shipped as DICOM Audit Messages (PS3.15 A.5, IHE ATNA) over syslog (RFC 5424
in RFC 6587 octet-counted frames) to a collector the test starts on 127.0.0.1 (TCP, and TLS
with a CA made by ``trustme``), from the real HTTP API: a failed login and a WADO-RS read arrive
as well-formed messages naming the user and no patient; a collector that is down never slows a
request, and what does not fit the queue is dropped and counted; ``dicom-node audit`` reads
the trail."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme
from sqlalchemy import select

from dicom_node import audit
from dicom_node.atna import SyslogExporter, split_actor
from dicom_node.settings import AuditSyslogSettings
from dicom_node.state import Study, open_database
from tests.dicomgen import CANARY_ID, CANARY_NAME, ct_series
from tests.peers import REPO, free_port, wait_until
from tests.test_roles import Node, serve
from tests.test_stow import MULTIPART, multipart

TOKEN = "tok-audit-8e21-secret"
SYSLOG_LINE = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<proc>\S+) (?P<msgid>\S+) (?P<sd>-) (?P<msg>.*)$",
    re.S,
)


class Collector:
    """A syslog collector: accepts TCP (or TLS) connections and reads octet-counted frames."""

    def __init__(self, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.tls = tls
        self.frames: list[bytes] = []
        self.errors: list[str] = []
        self.connections = 0
        self.open: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self.open.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            buffer = b""
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                while b" " in buffer:
                    length, _, rest = buffer.partition(b" ")
                    if not length.isdigit():
                        self.errors.append(f"bad frame length {length[:20]!r}")
                        return
                    if len(rest) < int(length):
                        break
                    self.frames.append(rest[: int(length)])
                    buffer = rest[int(length) :]
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(repr(exc))
        finally:
            conn.close()

    def messages(self) -> list[dict[str, Any]]:
        """Each frame parsed: the RFC 5424 header fields and the XML message as a tree."""
        out = []
        for frame in self.frames:
            match = SYSLOG_LINE.match(frame)
            assert match, frame[:200]
            msg = match["msg"]
            assert msg.startswith("\ufeff".encode()), "the message starts with a UTF-8 BOM"
            fields = {k: v.decode() for k, v in match.groupdict().items() if k != "msg"}
            out.append({**fields, "xml": msg[3:].decode(), "tree": ET.fromstring(msg[3:])})
        return out

    def close(self) -> None:
        """Stop listening and drop every connection, as a collector that goes down does."""
        self._stop = True
        for sock in (self.listener, *self.open):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept() or recv()
            sock.close()


def event_code(message: dict[str, Any]) -> str:
    return message["tree"].find("EventIdentification/EventID").get("csd-code")


def requestor(message: dict[str, Any]) -> Any:
    (user,) = [p for p in message["tree"].findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
    return user


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


def _stow(node: Node, tmp: Path) -> str:
    paths = ct_series(tmp, slices=2, size=16)
    r = requests.post(
        node.base + "/dicom-web/studies",
        data=multipart([p.read_bytes() for p in paths]),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": MULTIPART, "Accept": "application/dicom+json"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    with node.db.session() as s:
        return str(s.scalars(select(Study.study_instance_uid)).one())


def _http(**audit_settings: Any) -> dict[str, Any]:
    return {
        "http": {"tokens": [{"name": "ris-viewer", "token": TOKEN, "role": "admin"}], "login_failures": 1000},
        "audit": {"syslog": audit_settings},
    }


@pytest.mark.parametrize("participant", ["study-key", "study-uid"])
def test_login_failure_and_wado_read_reach_the_collector(
    collector: Collector, tmp_path: Path, participant: str
) -> None:
    settings = _http(host="127.0.0.1", port=collector.port, tls=False, participant=participant)
    with serve(tmp_path, **settings) as node:
        study_uid = _stow(node, tmp_path / "ct")
        bad = base64.b64encode(b"mallory:guess").decode()
        assert requests.get(node.base + "/api/jobs", headers={"Authorization": f"Basic {bad}"}, timeout=10).status_code == 401
        wado = {"Authorization": f"Bearer {TOKEN}", "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        assert requests.get(f"{node.base}/dicom-web/studies/{study_uid}", headers=wado, timeout=10).status_code == 200
        with node.db.session() as s:
            study_key = s.scalars(select(Study.study_key)).one()
        wait_until(lambda: len(collector.frames) >= 2, 20, message="two audit messages")
        exporter = node.server.app.state.audit_exporter
        assert exporter.dropped == 0

    messages = collector.messages()
    assert collector.errors == []
    by_code = {event_code(m): m for m in messages}
    assert set(by_code) == {"110114", "110103"}  # User Authentication, DICOM Instances Accessed
    for m in messages:
        assert m["pri"] == "85" and m["msgid"] == "IHE+RFC-3881" and m["app"] == "dicom-node"
        assert m["tree"].tag == "AuditMessage"
        assert m["tree"].find("AuditSourceIdentification").get("AuditSourceID") == "dicom-node"
        # patient-free: neither the patient's name nor ID, nor any secret
        for forbidden in (CANARY_NAME, CANARY_ID, "PHICANARY", TOKEN, "guess"):
            assert forbidden not in m["xml"]

    login = by_code["110114"]
    ident = login["tree"].find("EventIdentification")
    assert ident.get("EventOutcomeIndicator") == "4" and ident.get("EventActionCode") == "E"
    assert ident.find("EventTypeCode").get("csd-code") == "110122"  # Login
    assert requestor(login).get("UserID") == "?"  # not a configured user: the name is not kept
    assert requestor(login).get("NetworkAccessPointID") == "127.0.0.1"

    read = by_code["110103"]
    assert read["tree"].find("EventIdentification").get("EventOutcomeIndicator") == "0"
    assert requestor(read).get("UserID") == "ris-viewer"
    (obj,) = read["tree"].findall("ParticipantObjectIdentification")
    id_type = obj.find("ParticipantObjectIDTypeCode").get("csd-code")
    if participant == "study-uid":
        assert obj.get("ParticipantObjectID") == study_uid and id_type == "110180"
    else:
        assert obj.get("ParticipantObjectID") == study_key and study_uid not in read["xml"]


def test_tls_collector(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    collector = Collector(tls=server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        settings = AuditSyslogSettings(host="127.0.0.1", port=collector.port, tls=True, ca_certificates=ca_file)
        exporter = SyslogExporter(settings, "node-a", None).start()
        try:
            audit.record(None, audit.AUTH_FAILED, actor="http:alice@10.1.2.3", outcome="failure")
            wait_until(lambda: collector.frames, 20, message="a message over TLS")
        finally:
            exporter.close()
        (message,) = collector.messages()
        assert requestor(message).get("UserID") == "alice" and exporter.sent == 1
        assert collector.errors == []
    finally:
        collector.close()


def test_a_collector_that_is_down_never_blocks_and_drops_are_counted(tmp_path: Path) -> None:
    port = free_port()  # nobody listens yet
    settings = AuditSyslogSettings(host="127.0.0.1", port=port, tls=False, queue_size=5, timeout=1)
    exporter = SyslogExporter(settings, "node-a", None).start()
    collector = None
    try:
        started = time.monotonic()
        for n in range(50):
            audit.record(None, audit.AUTH_FAILED, actor=f"http:u{n}@10.0.0.1", outcome="failure")
        assert time.monotonic() - started < 1.0  # never waits for the collector
        wait_until(lambda: exporter.dropped >= 44, 10, message="drops counted")
        audit.record(None, audit.STUDY_RECEIVED, actor="x")  # not an exported event: not queued
        from dicom_node import metrics

        body = metrics.render(None)[0].decode()
        dropped = re.search(r'dicom_node_audit_export_messages_total\{outcome="dropped"\} (\S+)', body)
        assert dropped and float(dropped[1]) >= 44
        # The collector comes up: what waited in the queue is delivered.
        collector = up = Collector(port=port)
        wait_until(lambda: len(up.frames) >= 5, 40, message="queued messages after recovery")
        assert exporter.sent >= 5 and exporter.sent + exporter.dropped == 50
        # A collector restart is noticed on the next message (a new connection, nothing lost).
        collector.close()
        collector = again = Collector(port=port)
        audit.record(None, audit.AUTH_FAILED, actor="http:late@10.0.0.1", outcome="failure")
        wait_until(lambda: again.frames, 20, message="a message after the collector restarted")
    finally:
        exporter.close()
        if collector is not None:
            collector.close()
    assert collector is not None
    users = [requestor(m).get("UserID") for m in collector.messages()]
    assert users == ["late"]


def test_split_actor() -> None:
    assert split_actor("http:alice@example.org@10.0.0.5") == ("alice@example.org", "10.0.0.5")
    assert split_actor("CT01@10.0.0.7") == ("CT01", "10.0.0.7")
    assert split_actor(None) == ("-", None)


def test_the_audit_command(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    db = open_database(db_url)
    try:
        audit.record(db, audit.AUTH_FAILED, actor="http:?@10.0.0.9", outcome="failure", scheme="basic")
        audit.record(db, audit.HTTP_ACTION, actor="it-desk", job_id="j-1", action="retry")
    finally:
        db.dispose()
    env = {"DICOM_NODE_DATABASE_URL": db_url, "DICOM_NODE_DATA_DIR": str(tmp_path), "PYTHONPATH": str(REPO), "COLUMNS": "80"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dicom_node", "audit", *args], capture_output=True, text=True, timeout=60, env=env)

    out = run("--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["event"] for r in rows] == ["auth-failed", "http-action"]
    assert rows[1]["actor"] == "it-desk" and rows[1]["detail"] == {"action": "retry"}
    table = run("--since", "2000-01-01", "--limit", "1")
    assert table.returncode == 0 and "auth-failed" in table.stdout and "http-action" not in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 80
    # reading it was recorded
    again = run("--json", "--event", "audit-read")
    assert [json.loads(line)["actor"] for line in again.stdout.splitlines()] == ["cli", "cli"]
    bad = run("--since", "yesterday")
    assert bad.returncode == 2 and "ISO date" in bad.stderr
    assert "--since" in run("--help").stdout
