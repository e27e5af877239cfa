"""The job queue under faults, with a real redis-server, real `dicom-node serve` and real
`dicom-node worker` processes (Celery prefork), on SQLite and PostgreSQL.

After every fault, every complete study must be in exactly one terminal state.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.broker import RUN_JOB_TASK, make_celery, publish_job
from dicom_node.settings import load_settings
from dicom_node.state import JobState
from tests.dicomgen import ct_series
from tests.peers import RedisServer, wait_until
from tests.pipeline_env import MAX_ATTEMPTS, RECOVERY_BOUND, NodeEnv, running_owner_pid

pytestmark = pytest.mark.slow


@pytest.fixture
def env_factory(tmp_path: Path, database_url: str) -> Iterator[object]:
    made: list[NodeEnv] = []

    def make(**kw: object) -> NodeEnv:
        env = NodeEnv(tmp_path / f"node{len(made)}", database_url, **kw)  # type: ignore[arg-type]
        made.append(env)
        return env

    yield make
    for env in made:
        env.stop()


def _study(tmp: Path, name: str, **kw: object) -> list[Path]:
    return ct_series(tmp / name, slices=8, size=64, **kw)  # type: ignore[arg-type]


def test_one_study_one_job_done_once(env_factory, redis_server: RedisServer, tmp_path: Path) -> None:
    env = env_factory(broker_url=redis_server.url).start()
    env.add_worker()
    env.send(_study(tmp_path, "s1"))
    (job,) = env.wait_all_terminal(1)
    assert job.state == JobState.DONE.value, env.diagnostics()
    assert job.attempts == 1
    kinds = sorted(o.kind for o in env.outputs(job.id))
    assert kinds == ["seg", "sr", "summary"]
    assert set(job.timings) >= {"load", "detect", "encode"}
    env.assert_every_complete_study_terminal()


def test_node_restarted_during_quiet_period_still_creates_the_job(env_factory, redis_server: RedisServer, tmp_path: Path) -> None:
    env = env_factory(broker_url=redis_server.url, stable_seconds=4.0).start()
    env.send(_study(tmp_path, "s1"))
    assert env.node.stop() == 0
    assert env.jobs() == [], "the quiet period had not elapsed yet"
    env.node.start()
    env.add_worker()
    (job,) = env.wait_all_terminal(1)
    assert job.state == JobState.DONE.value, env.diagnostics()
    env.assert_every_complete_study_terminal()


def test_worker_child_killed_mid_job_runs_again_once(env_factory, redis_server: RedisServer, tmp_path: Path) -> None:
    env = env_factory(broker_url=redis_server.url, detector_seconds=6.0).start()
    worker = env.add_worker()
    env.send(_study(tmp_path, "s1"))
    (job,) = env.wait_for_jobs(1)
    running = env.wait_for_state(job.id, JobState.RUNNING)
    pid = running_owner_pid(running)
    assert pid in worker.children(), "the lease holder should be a prefork child of the worker"
    os.kill(pid, signal.SIGKILL)
    (job,) = env.wait_all_terminal(1, timeout=120)
    assert job.state == JobState.DONE.value, env.diagnostics()
    assert job.attempts == 2
    assert len([o for o in env.outputs(job.id) if o.kind == "sr"]) == 1
    env.assert_every_complete_study_terminal()


def test_whole_worker_killed_job_completes_after_a_new_worker_starts(env_factory, redis_server: RedisServer, tmp_path: Path) -> None:
    env = env_factory(broker_url=redis_server.url, detector_seconds=5.0).start()
    worker = env.add_worker("w1")
    env.send(_study(tmp_path, "s1"))
    (job,) = env.wait_for_jobs(1)
    env.wait_for_state(job.id, JobState.RUNNING)
    worker.kill()
    started = time.monotonic()
    env.add_worker("w2")
    # Documented bound: lease + reconcile interval, plus worker start-up and the job's own run time.
    bound = RECOVERY_BOUND + 60 + 5.0
    finished = env.wait_for_state(job.id, JobState.DONE, JobState.FAILED, timeout=bound)
    assert finished.state == JobState.DONE.value, env.diagnostics()
    assert finished.attempts == 2
    assert time.monotonic() - started < bound
    env.assert_every_complete_study_terminal()


def test_redis_restarted_empty_with_jobs_queued(env_factory, redis_server: RedisServer, tmp_path: Path) -> None:
    env = env_factory(broker_url=redis_server.url).start()
    for i in range(3):
        env.send(_study(tmp_path, f"s{i}"))
    jobs = env.wait_for_jobs(3)
    for j in jobs:
        env.wait_for_state(j.id, JobState.QUEUED)  # sent to Redis; no worker yet
    redis_server.restart()  # no persistence: every queued message is gone
    assert redis_server.client().dbsize() == 0
    env.add_worker()
    done = env.wait_all_terminal(3, timeout=120)
    assert all(j.state == JobState.DONE.value for j in done), env.diagnostics()
    assert all(j.dispatch_count >= 2 for j in done), "the reconciler re-sent the lost messages"
    env.assert_every_complete_study_terminal()


def test_redis_down_while_studies_arrive(env_factory, redis_server: RedisServer, tmp_path: Path) -> None:
    env = env_factory(broker_url=redis_server.url).start()
    env.add_worker()
    redis_server.kill()
    env.send(_study(tmp_path, "s1"))  # C-STORE does not depend on the broker
    (job,) = env.wait_for_jobs(1)
    time.sleep(2)
    assert env.job(job.id).state == JobState.WAITING.value, "the job waits in the outbox"
    redis_server.start()
    (job,) = env.wait_all_terminal(1, timeout=120)
    assert job.state == JobState.DONE.value, env.diagnostics()
    env.assert_every_complete_study_terminal()


def test_same_job_dispatched_twice_is_processed_once(env_factory, redis_server: RedisServer, tmp_path: Path) -> None:
    env = env_factory(broker_url=redis_server.url, detector_seconds=1.0).start()
    env.send(_study(tmp_path, "s1"))
    (job,) = env.wait_for_jobs(1)
    env.wait_for_state(job.id, JobState.QUEUED)
    # Two more copies of the message, as a broker redelivery or a double dispatch would produce.
    app = make_celery(load_settings(None, broker_url=redis_server.url, data_dir=tmp_path / "x"))
    for n in range(2):
        publish_job(app, RUN_JOB_TASK, job.id, queue=job.queue, task_id=f"dup-{n}")
    env.add_worker(concurrency=2)
    (job,) = env.wait_all_terminal(1)
    wait_until(lambda: redis_server.client().llen(job.queue) == 0, 30, message="queue drained")
    time.sleep(2)
    job = env.job(job.id)
    assert job.state == JobState.DONE.value and job.attempts == 1
    assert len([o for o in env.outputs(job.id) if o.kind in ("sr", "seg")]) == 2
    env.assert_every_complete_study_terminal()


def test_poison_job_fails_after_max_attempts_while_others_flow(env_factory, redis_server: RedisServer, tmp_path: Path) -> None:
    env = env_factory(broker_url=redis_server.url).start()
    env.add_worker()
    env.send(_study(tmp_path, "poison", description="POISON PILL"))
    env.send(_study(tmp_path, "fine1"))
    env.send(_study(tmp_path, "fine2"))
    jobs = env.wait_all_terminal(3, timeout=180)
    by_model = {}
    for j in jobs:
        by_model.setdefault(j.model, []).append(j)
    (poison,) = by_model["test-crash"]
    assert poison.state == JobState.FAILED.value
    assert poison.attempts == MAX_ATTEMPTS
    assert f"gave up after {MAX_ATTEMPTS} attempts" in (poison.reason or "")
    assert [j.state for j in by_model["test-slow"]] == [JobState.DONE.value, JobState.DONE.value]
    env.assert_every_complete_study_terminal()


def test_embedded_mode_runs_end_to_end_without_redis(env_factory, tmp_path: Path) -> None:
    env = env_factory(broker_url=None, embedded_workers=1).start()
    env.send(_study(tmp_path, "s1"))
    (job,) = env.wait_all_terminal(1, timeout=120)
    assert job.state == JobState.DONE.value, env.diagnostics()
    assert (env.node.data_dir / "broker.sqlite").exists()
    assert sorted(o.kind for o in env.outputs(job.id)) == ["seg", "sr", "summary"]
    env.assert_every_complete_study_terminal()
