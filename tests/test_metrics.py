"""``/metrics`` of a real ``dicom-node serve``: receiver counters summed over receiver processes,
and job metrics read from the state database, as a study flows through the node.

The page is parsed with prometheus_client's own parser (a malformed page fails the test).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from dicom_node import metrics
from dicom_node.state import Database, Instance, Job, JobState, Study, open_database, utcnow
from tests.dicomgen import ct_series
from tests.peers import Orthanc, RedisServer, free_port, wait_until
from tests.pipeline_env import NodeEnv

TOKEN = "metrics-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

CONFIG = """
[[routes]]
name = "ct"
modality = ["CT"]
models = ["test-slow"]

[models.test-slow]
plugin = "tests.plugins.detectors:SlowDetector"
[models.test-slow.options]
seconds = 3.0

[destinations.pacs]
url = "{pacs}"

[destinations.offline]
url = "dicom://NOBODY@127.0.0.1:{closed_port}"
max_attempts = 1
timeout = 5
"""


class Scrape:
    """One parsed /metrics page: ``value(name, **labels)`` sums the matching samples."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]

    def value(self, name: str, **labels: str) -> float:
        hits = [s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        return float(sum(hits))

    def has(self, name: str, **labels: str) -> bool:
        return any(s.name == name and all(s.labels.get(k) == v for k, v in labels.items()) for s in self.samples)

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        out = [
            (float(s.labels["le"]), s.value)
            for s in self.samples
            if s.name == f"{name}_bucket" and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        return sorted(out)


def scrape(base: str) -> Scrape:
    r = requests.get(f"{base}/metrics", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


@pytest.fixture
def env(tmp_path: Path, database_url: str, redis_server: RedisServer, clean_orthanc: Orthanc) -> Iterator[NodeEnv]:
    (tmp_path / "node").mkdir()
    node = NodeEnv(
        tmp_path / "node",
        database_url,
        broker_url=redis_server.url,
        config_text=CONFIG.format(pacs=clean_orthanc.dicomweb_url_with_credentials, closed_port=free_port()),
        extra_env={"DICOM_NODE_HTTP__TOKENS": f'["{TOKEN}"]', "DICOM_NODE_SCP__RECEIVERS": "2"},
    )
    try:
        yield node.start()
    finally:
        node.stop()


@pytest.mark.slow
def test_metrics_follow_a_study_through_the_node(env: NodeEnv, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{env.node.http_port}"
    wait_until(lambda: requests.get(f"{base}/healthz", timeout=5).status_code == 200, 30, message="healthz")
    assert requests.get(f"{base}/metrics", timeout=5).status_code == 401

    before = scrape(base)
    assert before.value("dicom_node_received_instances_total", source="dimse") == 0
    assert before.value("dicom_node_associations_total", outcome="accepted") == 0
    assert before.value("dicom_node_associations_active") == 0
    assert before.value("dicom_node_state_database_up") == 1
    assert sum(before.value("dicom_node_jobs", state=s.value) for s in JobState) == 0
    assert before.has("dicom_node_jobs", state="done")  # every state is listed, at 0
    assert not before.has("dicom_node_job_stage_duration_seconds_count")

    # A called AE title that is not ours: the association is rejected and counted.
    echo = subprocess.run(
        ["echoscu", "-aec", "NOTTHENODE", "127.0.0.1", str(env.node.dicom_port)], capture_output=True, text=True, timeout=30
    )
    assert echo.returncode != 0

    # The study in two associations (with two receiver processes, each may take one).
    paths = ct_series(tmp_path / "study", slices=8, size=64)
    env.send(paths[:4])
    env.send(paths[4:])
    # The count is made on the association's own thread in a receiver process. Runs that saw 1
    # of 2 here had lost the count itself (two threads creating the counters at once; see
    # tests/test_metrics_threads.py), not scraped early: the wait stays for a slow machine.
    wait_until(
        lambda: scrape(base).value("dicom_node_associations_total", outcome="accepted") >= 2,
        10,
        message="both associations counted",
    )
    received = scrape(base)
    assert received.value("dicom_node_received_instances_total", source="dimse") == 8
    assert received.value("dicom_node_cstore_responses_total", status="0x0000", outcome="success") == 8
    assert received.value("dicom_node_associations_total", outcome="accepted") == 2
    assert received.value("dicom_node_associations_total", outcome="rejected") == 1
    with env.db.session() as s:
        stored_bytes = s.scalar(select(func.sum(Instance.size)))
    assert received.value("dicom_node_received_bytes_total", source="dimse") == stored_bytes
    assert stored_bytes > 8 * 64 * 64 * 2
    wait_until(lambda: scrape(base).value("dicom_node_associations_active") == 0, 10, message="associations closed")

    # The job waits in the queue, then runs (the test detector takes 3 s) with no worker yet.
    (job,) = env.wait_for_jobs(1)
    queued = wait_until(
        lambda: (m := scrape(base)).value("dicom_node_queue_depth", queue=job.queue) == 1 and m, 30, message="queue depth 1"
    )
    assert queued.value("dicom_node_jobs", state="queued") + queued.value("dicom_node_jobs", state="waiting") == 1
    env.add_worker()
    running = wait_until(lambda: (m := scrape(base)).value("dicom_node_jobs", state="running") == 1 and m, 60, message="job running")
    assert running.value("dicom_node_queue_depth", queue=job.queue) == 0

    # Finished: one destination took the results, the other (nothing listens) failed for good.
    (job,) = env.wait_all_terminal(1, timeout=120)
    assert job.state == JobState.FAILED.value and "offline" in (job.reason or ""), env.diagnostics()
    done = scrape(base)
    assert done.value("dicom_node_jobs", state="failed") == 1
    assert sum(done.value("dicom_node_jobs", state=s.value) for s in JobState) == 1
    assert done.value("dicom_node_jobs_finished_total", model="test-slow", state="failed") == 1
    for stage in ("load", "detect", "encode", "deliver"):
        assert stage in job.timings, job.timings
        assert done.value("dicom_node_job_stage_duration_seconds_count", stage=stage) == 1
        assert done.value("dicom_node_job_stage_duration_seconds_sum", stage=stage) == pytest.approx(job.timings[stage])
        buckets = done.buckets("dicom_node_job_stage_duration_seconds", stage=stage)
        counts = [c for _, c in buckets]
        assert counts == sorted(counts) and buckets[-1] == (float("inf"), 1.0)
        # the observation sits in the first bucket whose bound is >= the stage's time
        first = next(le for le, c in buckets if c == 1)
        assert first >= job.timings[stage] and all(le < job.timings[stage] for le, c in buckets if c == 0)
    assert done.value("dicom_node_inference_duration_seconds_count", model="test-slow") == 1
    assert done.value("dicom_node_inference_duration_seconds_sum", model="test-slow") >= 3.0
    assert done.value("dicom_node_job_turnaround_seconds_count", model="test-slow") == 1
    assert done.value("dicom_node_model_results_total", model="test-slow", result="positive") == 1
    assert done.value("dicom_node_model_results_total", model="test-slow", result="negative") == 0
    assert done.value("dicom_node_model_positive_ratio", model="test-slow") == 1.0
    assert done.value("dicom_node_delivery_attempts_total", destination="pacs") == 1
    assert done.value("dicom_node_delivery_failures_total", destination="pacs") == 0
    assert done.value("dicom_node_deliveries", destination="pacs", state="done") == 1
    assert done.value("dicom_node_delivery_attempts_total", destination="offline") == 1
    assert done.value("dicom_node_delivery_failures_total", destination="offline") == 1
    assert done.value("dicom_node_deliveries", destination="offline", state="failed") == 1
    assert done.value("dicom_node_queue_depth") == 0

    # Scraping again counts nothing twice (finished jobs are read incrementally).
    again = scrape(base)
    assert again.value("dicom_node_job_stage_duration_seconds_count", stage="detect") == 1
    assert again.value("dicom_node_received_instances_total", source="dimse") == 8
    assert "PHICANARY" not in done.text

    # The same figures without HTTP, from `dicom-node metrics` (text for node_exporter, JSON).
    textfile = tmp_path / "dicom_node.prom"
    assert env.node.run("metrics", "--textfile", str(textfile)).returncode == 0
    offline = Scrape(textfile.read_text())
    assert offline.value("dicom_node_received_instances_total", source="dimse") == 8
    assert offline.value("dicom_node_jobs", state="failed") == 1
    assert offline.value("dicom_node_job_stage_duration_seconds_count", stage="detect") == 1
    out = env.node.run("metrics", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {"name": "dicom_node_deliveries", "labels": {"destination": "pacs", "state": "done"}, "value": 1.0} in rows


def test_metrics_command_exit_code_when_the_database_is_down(tmp_path: Path) -> None:
    from tests.peers import NodeProcess

    node = NodeProcess(tmp_path / "var", {"DICOM_NODE_DATABASE_URL": f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none"})
    out = node.run("metrics")
    assert out.returncode == 3, out.stdout + out.stderr
    assert "dicom_node_state_database_up 0.0" in out.stdout and "cannot be reached" in out.stderr


# -- the state collector on its own, against both database backends ---------------------------


def _finished_job(
    db: Database, study_id: int, n: int, *, finished_ago: float, detect: float, findings: int, version: str | None = None
) -> str:
    now = utcnow()
    job_id = f"00000000-0000-0000-0000-{n:012d}"
    with db.session() as s:
        s.add(
            Job(
                id=job_id,
                study_id=study_id,
                study_version=1,
                rule="ct",
                model="m1",
                model_version=version,
                state=JobState.DONE.value,
                input_hash=f"{n:064x}",
                created_at=now - timedelta(seconds=finished_ago + 10),
                finished_at=now - timedelta(seconds=finished_ago),
                updated_at=now,
                timings={"load": 0.2, "detect": detect},
                summary={"finding_count": findings},
            )
        )
    return job_id


def test_state_collector_counts_each_finished_job_once(database_url: str) -> None:
    db = open_database(database_url)
    try:
        now = utcnow()
        with db.session() as s:
            study = Study(study_key="a" * 24, study_instance_uid="1.2.3", first_received_at=now, last_received_at=now)
            s.add(study)
            s.flush()
            study_id = study.id
        collector = metrics.StateCollector(db)

        def current() -> Scrape:
            from prometheus_client import CollectorRegistry, generate_latest

            registry = CollectorRegistry()
            registry.register(collector)
            return Scrape(generate_latest(registry).decode())

        _finished_job(db, study_id, 1, finished_ago=3600, detect=0.5, findings=0)
        _finished_job(db, study_id, 2, finished_ago=60, detect=2.0, findings=2)
        first = current()
        assert first.value("dicom_node_inference_duration_seconds_count", model="m1") == 2
        assert first.value("dicom_node_inference_duration_seconds_sum", model="m1") == pytest.approx(2.5)
        assert first.value("dicom_node_model_results_total", model="m1", result="positive") == 1
        assert first.value("dicom_node_model_positive_ratio", model="m1") == 0.5
        assert first.buckets("dicom_node_job_stage_duration_seconds", stage="detect")[:5] == [
            (0.05, 0), (0.1, 0), (0.25, 0), (0.5, 1), (1.0, 1)
        ]

        # A job whose finish time lies before the newest one seen (a worker with a slow clock,
        # or a late commit) is still counted, once; the others are not counted again.
        _finished_job(db, study_id, 3, finished_ago=120, detect=1.0, findings=1)
        second = current()
        assert second.value("dicom_node_inference_duration_seconds_count", model="m1") == 3
        assert second.value("dicom_node_jobs_finished_total", model="m1", state="done") == 3
        assert current().value("dicom_node_inference_duration_seconds_count", model="m1") == 3

        # A retried job that finishes again is a new observation.
        with db.session() as s:
            job = s.get(Job, "00000000-0000-0000-0000-000000000002")
            job.finished_at = utcnow()
        assert current().value("dicom_node_inference_duration_seconds_count", model="m1") == 4
    finally:
        db.dispose()


def test_model_metrics_are_per_model_version(sqlite_url: str) -> None:
    db = open_database(sqlite_url)
    try:
        now = utcnow()
        with db.session() as s:
            study = Study(study_key="b" * 24, study_instance_uid="1.2.4", first_received_at=now, last_received_at=now)
            s.add(study)
            s.flush()
            study_id = study.id
        collector = metrics.StateCollector(db)

        def current() -> Scrape:
            body, _ = metrics.render(collector, this_process=False)
            return Scrape(body.decode())

        # A weights update: version 1.0 before, 2.0 after; each is its own series.
        _finished_job(db, study_id, 1, finished_ago=300, detect=4.0, findings=1, version="1.0")
        _finished_job(db, study_id, 2, finished_ago=200, detect=4.0, findings=0, version="1.0")
        _finished_job(db, study_id, 3, finished_ago=100, detect=1.0, findings=1, version="2.0")
        page = current()
        assert page.value("dicom_node_inference_duration_seconds_sum", model="m1", version="1.0") == 8.0
        assert page.value("dicom_node_inference_duration_seconds_sum", model="m1", version="2.0") == 1.0
        assert page.value("dicom_node_model_positive_ratio", model="m1", version="1.0") == 0.5
        assert page.value("dicom_node_model_positive_ratio", model="m1", version="2.0") == 1.0
        assert page.value("dicom_node_jobs_finished_total", model="m1", version="2.0", state="done") == 1
        assert page.value("dicom_node_job_turnaround_seconds_count", model="m1", version="1.0") == 2

        # Bounded: only the newest MAX_VERSIONS_PER_MODEL versions of a model keep series.
        for n in range(metrics.MAX_VERSIONS_PER_MODEL):
            _finished_job(db, study_id, 10 + n, finished_ago=50 - n, detect=1.0, findings=0, version=f"3.{n}")
        page = current()
        versions = {s.labels["version"] for s in page.samples if s.name == "dicom_node_inference_duration_seconds_count"}
        assert versions == {f"3.{n}" for n in range(metrics.MAX_VERSIONS_PER_MODEL)}
    finally:
        db.dispose()


def test_database_down_is_reported_not_raised() -> None:
    db = Database(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none?connect_timeout=2")
    body, content_type = metrics.render(metrics.StateCollector(db))
    page = Scrape(body.decode())
    assert content_type.startswith("text/plain")
    assert page.value("dicom_node_state_database_up") == 0
    assert not page.has("dicom_node_jobs")


# -- the receiver hook with real associations ---------------------------------------------------


def test_receiver_observer_tracks_open_associations(receiver, tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    receiver.observers.append(metrics.receiver_observer)
    m = metrics._receiver_metrics()

    def value(metric, **labels) -> float:
        return metric.labels(**labels)._value.get() if labels else metric._value.get()

    accepted0 = value(m.associations, outcome="accepted")
    stored0 = value(m.instances, source="dimse")
    ae = AE(ae_title="METRICS")
    ae.add_requested_context(CTImageStorage)
    paths = ct_series(tmp_path / "s", slices=2, size=32)
    host, port = receiver.server.server_address[:2]
    first = ae.associate(host, port, ae_title=receiver.settings.ae_title)
    second = ae.associate(host, port, ae_title=receiver.settings.ae_title)
    assert first.is_established and second.is_established
    wait_until(lambda: value(m.active) == 2, 10, message="two open associations")
    assert first.send_c_store(paths[0]).Status == 0
    first.release()
    wait_until(lambda: value(m.active) == 1, 10, message="one open association")
    second.abort()
    wait_until(lambda: value(m.active) == 0, 10, message="no open association")
    assert value(m.associations, outcome="accepted") == accepted0 + 2
    assert value(m.instances, source="dimse") == stored0 + 1
