"""Job priority (issue 20, item 5): a stat study overtakes the routine backlog.

A real `dicom-node serve`, a real redis-server and ONE real `dicom-node worker` process
(concurrency 1) running the test detector that takes a fixed time per job. Five routine studies
go in first; once the worker is busy with one of them and the rest wait in Redis, a study that a
``priority = "stat"`` rule matches arrives. Its job must finish before the routine jobs that
were still waiting: no later than second, by the recorded finish times.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.state import JobState
from tests.dicomgen import ct_series
from tests.peers import RedisServer, wait_until
from tests.pipeline_env import NodeEnv

pytestmark = pytest.mark.slow

DETECTOR_SECONDS = 3.0
"""Long enough that the stat study arrives while the routine backlog still waits."""

CONFIG = f"""
[[routes]]
name = "emergency"
series_description = "^STAT"
models = ["test-slow"]
priority = "stat"

[[routes]]
name = "ct"
modality = ["CT"]
series_description = "^(?!STAT)"
models = ["test-slow"]

[models.test-slow]
plugin = "tests.plugins.detectors:SlowDetector"
[models.test-slow.options]
seconds = {DETECTOR_SECONDS}
"""


@pytest.fixture
def env(tmp_path: Path, sqlite_url: str, redis_server: RedisServer) -> Iterator[NodeEnv]:
    node = NodeEnv(
        tmp_path / "node", sqlite_url, broker_url=redis_server.url, config_text=CONFIG
    ).start()
    try:
        yield node
    finally:
        node.stop()


@pytest.mark.timeout(300)
def test_stat_study_overtakes_the_routine_backlog(
    env: NodeEnv, redis_server: RedisServer, tmp_path: Path
) -> None:
    env.add_worker(concurrency=1)
    routine = []
    for i in range(5):
        routine += ct_series(tmp_path / f"routine{i}", slices=6, size=48, seed=i)
    env.send(routine)  # one association, five studies
    env.wait_for_jobs(5)
    wait_until(
        lambda: any(j.state == JobState.RUNNING.value for j in env.jobs()),
        90,
        0.2,
        "the worker busy with a routine job",
    )
    # The rest wait in Redis, in the routine priority's list (kombu: queue + "\x06\x16" + "3").
    waiting = redis_server.client().llen("cpu\x06\x163")
    assert waiting >= 3, env.diagnostics()

    env.send(ct_series(tmp_path / "stat", slices=6, size=48, description="STAT CHEST CT"))
    jobs = env.wait_all_terminal(6, timeout=180)
    assert all(j.state == JobState.DONE.value for j in jobs), env.diagnostics()

    (stat,) = [j for j in jobs if j.rule == "emergency"]
    assert stat.priority == "stat"
    assert sorted(j.priority or "" for j in jobs if j is not stat) == ["routine"] * 5
    by_finish = sorted(jobs, key=lambda j: j.finished_at)  # type: ignore[arg-type, return-value]
    order = [("STAT" if j is stat else "routine") for j in by_finish]
    assert by_finish.index(stat) <= 1, f"finish order {order}\n{env.diagnostics()}"
    # It overtook the routine jobs that had been waiting when it arrived (at least three).
    assert stat.created_at is not None
    overtaken = [
        j for j in jobs if j is not stat and j.finished_at > stat.finished_at  # type: ignore[operator]
    ]
    assert len(overtaken) >= 3, order

    # `dicom-node jobs` says which job was stat, under its state, within 80 columns.
    listing = env.node.run("jobs")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, listing.stdout
    stat_rows = [line for line in lines if line.split()[:2] == ["done", "stat"]]
    assert len(stat_rows) == 1 and stat.id[:8] in stat_rows[0], listing.stdout


def test_dispatcher_sends_stat_first_on_the_embedded_broker(
    make_settings: Any, tmp_path: Path
) -> None:
    """The outbox goes out stat, routine, research, whatever order the jobs were made in; the
    embedded broker (no message priorities) keeps that order."""
    from kombu.simple import SimpleQueue

    from dicom_node.broker import make_celery
    from dicom_node.dispatch import Dispatcher
    from dicom_node.jobs import JobSpec, create_job
    from dicom_node.state import Study, open_database, utcnow

    settings = make_settings()
    assert settings.embedded_broker
    db = open_database(settings.resolved_database_url)
    now = utcnow()
    made: dict[str, str] = {}
    with db.session() as s:
        for i, priority in enumerate(["research", "routine", "stat", "routine"]):
            study = Study(
                study_key=f"{i:032x}",
                study_instance_uid=f"1.2.3.{i}",
                first_received_at=now,
                last_received_at=now,
            )
            s.add(study)
            s.flush()
            spec = JobSpec(
                study_id=study.id,
                study_instance_uid=study.study_instance_uid,
                study_version=1,
                input_hash=f"{i:064x}",
                input_count=1,
                rule=f"rule-{priority}",
                model="test-slow",
                queue="cpu",
                max_attempts=1,
                priority=priority,
            )
            job_id = create_job(s, spec, now)
            assert job_id is not None
            made[job_id] = f"{priority}-{i}"
    app = make_celery(settings)
    try:
        assert Dispatcher(db, app).run_once() == 4
        with app.connection_for_read() as conn:
            queue = SimpleQueue(conn, "cpu")
            order = []
            for _ in made:
                message = queue.get(timeout=10)
                order.append(made[message.headers["id"].split("-", 1)[1].rsplit("-", 1)[0]])
                message.ack()
            queue.close()
    finally:
        db.dispose()
    assert order == ["stat-2", "routine-1", "routine-3", "research-0"]
