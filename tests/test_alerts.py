"""Alerts: health gauges, the shipped Prometheus rules and Grafana dashboard, and signed
webhooks.

* the webhook signature scheme (sign / verify, replays, tampering);
* the sender's bounded queue: a receiver that hangs never blocks the caller, and what does not
  fit is dropped and counted; a receiver that fails once gets the same body again, re-signed;
* ``docker/prometheus/alerts.yml`` and ``docker/grafana/dicom-node.json`` name only metrics
  the node exposes (and ``promtool check rules`` accepts the rules, where promtool is installed);
* end to end: a real ``dicom-node serve`` delivering to a real Orthanc, and a webhook receiver
  that checks every signature: Orthanc stopped -> one ``destination-down``; Orthanc back ->
  ``destination-recovered`` after the retry succeeds; nothing patient-identifying in any body.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from dicom_node import metrics
from dicom_node.alerts import webhooks
from dicom_node.alerts.health import destination_health
from dicom_node.alerts.monitor import AlertMonitor
from dicom_node.alerts.webhooks import WebhookSender, sign, verify
from dicom_node.settings import AlertSettings, Settings
from dicom_node.state import Delivery, Job, JobState, ProbeResult, Study, open_database, utcnow
from tests.dicomgen import ct_series
from tests.peers import Orthanc, RedisServer, wait_until
from tests.pipeline_env import DEFAULT_CONFIG, NodeEnv

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "docker" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "docker" / "grafana" / "dicom-node.json"
SECRET = "webhook-secret-for-tests-0123456789"
TOKEN = "alerts-test-token"


# -- a webhook receiver on loopback -------------------------------------------------------------


class Receiver:
    """Records every POST (headers and body); answers ``statuses`` in turn, then 200."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses = list(statuses or [])
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.requests.append((dict(self.headers.items()), body))
                status = owner.statuses.pop(0) if owner.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def events(self) -> list[dict[str, Any]]:
        """The bodies received, each checked against its signature first."""
        out = []
        for headers, body in self.requests:
            assert verify(
                SECRET, headers[webhooks.TIMESTAMP_HEADER], body, headers[webhooks.SIGNATURE_HEADER]
            ), headers
            event = json.loads(body)
            assert headers[webhooks.EVENT_HEADER] == event["event"]
            out.append(event)
        return out


def _alerts(url: str, **hook: Any) -> AlertSettings:
    return AlertSettings.model_validate(
        {
            "webhooks": [{"url": url, "secret": SECRET, **hook}],
            "queue_size": 3,
            "backoff_initial": 0.1,
            "backoff_max": 0.2,
        }
    )


def _count(outcome: str) -> float:
    return REGISTRY.get_sample_value("dicom_node_webhooks_total", {"outcome": outcome}) or 0.0


# -- signing ------------------------------------------------------------------------------------


def test_signature_covers_timestamp_and_body() -> None:
    body = b'{"event":"destination-down"}'
    now = 1_800_000_000
    stamp = str(now)
    signature = sign(SECRET, stamp, body)
    assert re.fullmatch(r"sha256=[0-9a-f]{64}", signature)
    assert verify(SECRET, stamp, body, signature, now=now + 10)
    assert not verify(SECRET, stamp, body + b" ", signature, now=now)  # body changed
    assert not verify("another-secret-0123456789", stamp, body, signature, now=now)
    assert not verify(SECRET, str(now + 1), body, signature, now=now)  # timestamp changed
    assert not verify(SECRET, stamp, body, signature, now=now + 301)  # replayed later
    assert not verify(SECRET, "yesterday", body, signature, now=now)


def test_log_target_hides_credentials() -> None:
    assert (
        webhooks.safe_target("https://u:p@hooks.example:8443/x?token=abc")
        == "https://hooks.example:8443/x"
    )


# -- the sender ---------------------------------------------------------------------------------


def test_a_hanging_receiver_never_blocks_emit_and_overflow_is_dropped() -> None:
    # A peer that accepts connections (the kernel's backlog) and never answers.
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(64)
    url = f"http://127.0.0.1:{hang.getsockname()[1]}/hook"
    sender = WebhookSender(_alerts(url, timeout=2.0, max_attempts=1))
    sender.start()
    dropped = _count("dropped")
    try:
        started = time.monotonic()
        queued = sum(sender.emit("job-failed", {"event": "job-failed", "n": n}) for n in range(50))
        assert time.monotonic() - started < 0.5
        assert 3 <= queued <= 4  # the queue (3) and at most the one being sent
        assert _count("dropped") - dropped == 50 - queued
    finally:
        started = time.monotonic()
        sender.stop(timeout=5)
        hang.close()
    assert time.monotonic() - started < 5


def test_a_failed_send_is_retried_with_the_same_body_signed_again() -> None:
    with Receiver(statuses=[503]) as receiver:
        sender = WebhookSender(_alerts(receiver.url))
        sender.start()
        sent, retried = _count("sent"), _count("retried")
        try:
            assert (
                sender.emit(
                    "destination-down", {"event": "destination-down", "destination": "pacs"}
                )
                == 1
            )
            wait_until(lambda: len(receiver.requests) == 2, 10, message="the retry")
        finally:
            sender.stop()
        first, second = receiver.events()
        assert first == second == {"event": "destination-down", "destination": "pacs"}
        assert receiver.requests[0][1] == receiver.requests[1][1]
        assert _count("sent") - sent == 1 and _count("retried") - retried == 1


def test_finding_events_follow_each_webhooks_size_rule() -> None:
    settings = AlertSettings.model_validate(
        {
            "webhooks": [
                {
                    "url": "http://127.0.0.1:9/big",
                    "secret": SECRET,
                    "events": ["finding"],
                    "min_finding_mm": 20,
                },
                {
                    "url": "http://127.0.0.1:9/all",
                    "secret": SECRET,
                    "events": ["finding", "job-failed"],
                },
            ]
        }
    )
    sender = WebhookSender(settings)  # not started: only what is queued is looked at
    assert sender.emit("finding", {"event": "finding", "largest_finding_mm": 12.0}) == 1
    assert sender.emit("finding", {"event": "finding", "largest_finding_mm": 25.0}) == 2
    assert sender.emit("disk-low", {"event": "disk-low"}) == 0
    assert sender.emit("job-failed", {"event": "job-failed"}) == 1


def test_webhook_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        Settings.model_validate(
            {"alerts": {"webhooks": [{"url": "http://h/x", "secret": "short"}]}}
        )
    with pytest.raises(ValueError, match="http"):
        Settings.model_validate({"alerts": {"webhooks": [{"url": "ftp://h/x", "secret": SECRET}]}})
    with pytest.raises(ValueError):
        Settings.model_validate(
            {
                "alerts": {
                    "webhooks": [{"url": "http://h/x", "secret": SECRET, "events": ["coffee"]}]
                }
            }
        )


# -- the monitor over a state database ---------------------------------------------------------


def _job(db: Any, n: int, state: JobState, **values: Any) -> str:
    now = utcnow()
    job_id = f"00000000-0000-0000-0000-{n:012d}"
    with db.session() as s:
        study = s.scalar(select(Study).where(Study.study_key == "k" * 24))
        if study is None:
            study = Study(
                study_key="k" * 24,
                study_instance_uid="1.2.826.0.1.3680043.2.1125.99",
                first_received_at=now,
                last_received_at=now,
            )
            s.add(study)
            s.flush()
        s.add(
            Job(
                id=job_id,
                study_id=study.id,
                study_version=1,
                rule="ct",
                model="m1",
                model_version="2.1",
                state=state.value,
                input_hash=f"{n:064x}",
                created_at=now,
                updated_at=now,
                finished_at=now if state.terminal else None,
                timings={},
                summary={},
                **values,
            )
        )
    return job_id


def test_destination_health_from_deliveries_and_probes(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'state.sqlite'}")
    t0 = utcnow()

    def at(seconds: float) -> datetime:
        return t0 + timedelta(seconds=seconds)

    def health() -> bool:
        with db.session() as s:
            return destination_health(s, ["pacs"])["pacs"]

    def delivery(n: int, state: str, when: float) -> None:
        job_id = _job(db, n, JobState.DELIVERING)
        with db.session() as s:
            s.get(Job, job_id).updated_at = at(when)  # type: ignore[union-attr]
            s.add(
                Delivery(
                    job_id=job_id,
                    destination="pacs",
                    state=state,
                    attempts=1,
                    delivered_at=at(when) if state == "done" else None,
                )
            )

    def probe(ok: bool, when: float) -> None:
        with db.session() as s:
            s.add(ProbeResult(destination="pacs", at=at(when), ok=ok))

    try:
        assert health()  # nothing on record
        delivery(1, "retry", 10)
        assert not health()
        probe(True, 20)
        assert not health()  # a retry is still pending: an answering C-ECHO does not clear it
        delivery(2, "done", 30)
        assert health()
        delivery(3, "failed", 40)
        assert not health()  # given up after the last success
        probe(True, 50)
        assert health()  # ... and answering again since
        probe(False, 60)
        assert not health()  # the latest probe failed
        with db.session() as s:
            assert destination_health(s, ["pacs", "other"])["other"]
    finally:
        db.dispose()


def test_monitor_turns_database_changes_into_events(tmp_path: Path) -> None:
    with Receiver() as receiver:
        settings = Settings.model_validate(
            {
                "data_dir": tmp_path / "var",
                "destinations": {"pacs": {"url": "http://127.0.0.1:9/dicom-web"}},
                "alerts": {
                    "webhooks": [{"url": receiver.url, "secret": SECRET}],
                    "disk_low_bytes": 2**62,
                },
            }
        )
        Path(settings.spool_dir).mkdir(parents=True)
        db = open_database(settings.resolved_database_url)
        monitor = AlertMonitor(settings, db)
        monitor.sender.start()
        try:
            monitor.check()  # the disks are "low" against a 4 EiB threshold; nothing else yet
            failed = _job(db, 1, JobState.FAILED, reason="model crashed")
            delivering = _job(db, 2, JobState.DELIVERING)
            with db.session() as s:
                s.add(
                    Delivery(
                        job_id=delivering,
                        destination="pacs",
                        state="retry",
                        attempts=1,
                        last_error="refused",
                    )
                )
            monitor.check()
            monitor.check()  # the same state again: no new events
            with db.session() as s:
                d = s.scalars(select(Delivery).where(Delivery.job_id == delivering)).one()
                d.state, d.delivered_at = "done", utcnow()
            monitor.check()
            wait_until(
                lambda: monitor.sender.pending() == 0 and len(receiver.requests) >= 5,
                10,
                message="five events",
            )
        finally:
            monitor.sender.stop()  # lets a send in flight finish
            db.dispose()
        events = receiver.events()
        assert len(events) == 5, events
        assert [(e["event"], e.get("disk")) for e in events[:2]] == [
            ("disk-low", "spool"),
            ("disk-low", "database"),
        ]
        assert events[2]["event"] == "destination-down" and events[2]["destination"] == "pacs"
        assert events[3] == {
            **events[3],
            "event": "job-failed",
            "job_id": failed,
            "reason": "model crashed",
            "model_version": "2.1",
        }
        assert events[4]["event"] == "destination-recovered"
        assert all("1.2.826.0.1.3680043.2.1125.99" not in json.dumps(e) for e in events)


# -- rules and dashboard ------------------------------------------------------------------------

_NAME = re.compile(r"\bdicom_node_[a-z0-9_]+")


def _used_names() -> dict[str, set[str]]:
    rules = yaml.safe_load(RULES.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    targets = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    targets.append(dashboard["templating"]["list"][1]["definition"])
    return {
        "rules": {n for e in exprs for n in _NAME.findall(str(e))},
        "dashboard": {n for e in targets for n in _NAME.findall(e)},
    }


def _exposed(text: str) -> set[str]:
    """Every series name a Prometheus scraping ``text`` stores (histograms: _bucket/_sum/_count)."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names.update(s.name for s in fam.samples)
        if fam.type == "histogram":
            names.update(f"{fam.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif fam.type == "counter":
            names.add(f"{fam.name}_total")
        else:
            names.add(fam.name)
    return names


def test_rules_and_dashboard_name_only_exposed_metrics(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var", destination="http://127.0.0.1:9/dicom-web")
    Path(settings.spool_dir).mkdir(parents=True)
    db = open_database(settings.resolved_database_url)
    try:
        metrics._receiver_metrics()
        webhooks.count("sent")
        body, _ = metrics.render(metrics.StateCollector(db, settings))
    finally:
        db.dispose()
    exposed = _exposed(body.decode())
    used = _used_names()
    assert len(used["rules"]) >= 8 and len(used["dashboard"]) >= 12
    for where, names in used.items():
        assert names <= exposed, (
            f"{where} names metrics the node does not expose: {sorted(names - exposed)}"
        )
    rules = yaml.safe_load(RULES.read_text())
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
        assert rule["alert"].startswith("DicomNode") and rule["annotations"]["summary"]
        assert rule["labels"]["severity"] in ("warning", "critical")


def test_promtool_accepts_the_rules() -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    out = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 10 rules found" in out.stdout


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    """A dedicated Orthanc that the test stops and starts again on the same ports."""
    server = Orthanc(tmp_path / "pacs").start()
    yield server
    server.stop()


def _config(pacs: Orthanc, receiver: Receiver) -> str:
    return (
        DEFAULT_CONFIG.format(seconds=0.0)
        + f"""
[destinations.pacs]
url = "{pacs.dicomweb_url_with_credentials}"
max_attempts = 50
backoff_initial = 1.0
backoff_max = 2.0
timeout = 5

[alerts]
interval = 0.5

[[alerts.webhooks]]
url = "{receiver.url}"
secret = "{SECRET}"
events = ["destination-down", "destination-recovered", "job-failed", "finding"]
"""
    )


def _scrape(port: int) -> str:
    r = requests.get(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert r.status_code == 200, r.text
    return r.text


def _destination_up(text: str) -> float | None:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "dicom_node_destination_up" and s.labels.get("destination") == "pacs":
                return s.value
    return None


@pytest.mark.slow
def test_destination_down_and_recovered_reach_a_signed_webhook(
    tmp_path: Path, sqlite_url: str, redis_server: RedisServer, pacs: Orthanc
) -> None:
    with Receiver() as receiver:
        env = NodeEnv(
            tmp_path / "node",
            sqlite_url,
            broker_url=redis_server.url,
            config_text=_config(pacs, receiver),
            extra_env={"DICOM_NODE_HTTP__TOKENS": TOKEN},
        ).start()
        try:
            env.add_worker()
            port = env.node.http_port
            wait_until(
                lambda: requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).ok,
                30,
                message="healthz",
            )
            assert _destination_up(_scrape(port)) == 1.0

            pacs.stop()
            study = ct_series(tmp_path / "ct", slices=8, size=64)
            env.send(study)
            (job,) = env.wait_for_jobs(1)
            wait_until(
                lambda: [e["event"] for e in receiver.events()] == ["destination-down"],
                90,
                0.2,
                "destination-down",
            )
            assert _destination_up(_scrape(port)) == 0.0

            # More failed attempts while Orthanc stays down: still one event (edge-triggered).
            def attempts() -> int:
                with env.db.session() as s:
                    return int(
                        s.scalar(select(Delivery.attempts).where(Delivery.job_id == job.id)) or 0
                    )

            wait_until(lambda: attempts() >= 3, 30, 0.2, "three failed delivery attempts")
            time.sleep(1.0)  # two monitor intervals after the last failure
            assert [e["event"] for e in receiver.events()] == ["destination-down"]

            pacs.start()
            done = env.wait_for_state(job.id, JobState.DONE, timeout=60)
            assert done.state == JobState.DONE.value, env.diagnostics()
            wait_until(lambda: len(receiver.events()) >= 3, 30, 0.2, "recovered and finding")
            events = receiver.events()
            assert [e["event"] for e in events] == [
                "destination-down",
                "destination-recovered",
                "finding",
            ]
            assert _destination_up(_scrape(port)) == 1.0

            down, recovered, finding = events
            assert down["destination"] == recovered["destination"] == "pacs"
            assert down["node"] == "dicom-node" and down["time"]
            assert (
                finding["job_id"] == job.id
                and finding["model"] == "test-slow"
                and finding["model_version"] == "1.0.0"
            )
            assert finding["finding_count"] == 1 and finding["largest_finding_mm"] > 0

            # Nothing that identifies the patient or the study travels in a webhook.
            ds = pydicom.dcmread(study[0])
            secrets = [
                str(ds.get(k, ""))
                for k in (
                    "PatientName",
                    "PatientID",
                    "AccessionNumber",
                    "StudyInstanceUID",
                    "SeriesInstanceUID",
                )
            ]
            for _, body in receiver.requests:
                for value in filter(None, secrets):
                    assert value.encode() not in body

            # Every name the rules use is on the running node's page.
            exposed = _exposed(_scrape(port))
            assert _used_names()["rules"] <= exposed
        finally:
            env.stop()
