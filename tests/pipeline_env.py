"""A whole node for end-to-end tests: `dicom-node serve` + `dicom-node worker` processes on a
real broker and state database, with test detectors whose timing and failures are controllable."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dicom_node.state import Database, Job, JobState, Output, Study
from tests.peers import NodeProcess, WorkerProcess, storescu, wait_until

LEASE_SECONDS = 4.0
RECONCILE_INTERVAL = 1.0
QUEUED_TIMEOUT = 5.0
MAX_ATTEMPTS = 3

# The documented recovery bound after a worker dies (README "Reliability"): the dead attempt's
# lease must expire, then the reconciler re-sends at its next pass, then a worker picks it up.
RECOVERY_BOUND = LEASE_SECONDS + RECONCILE_INTERVAL

DEFAULT_CONFIG = """
[[routes]]
name = "poison"
series_description = "POISON"
models = ["test-crash"]

[[routes]]
name = "ct"
modality = ["CT"]
series_description = "^(?!POISON)"
models = ["test-slow"]

[models.test-slow]
plugin = "tests.plugins.detectors:SlowDetector"
[models.test-slow.options]
seconds = {seconds}

[models.test-crash]
plugin = "tests.plugins.detectors:CrashingDetector"
"""


class NodeEnv:
    """A node (+ workers) in ``tmp``; ``db`` reads the same state database the node writes."""

    def __init__(
        self,
        tmp: Path,
        database_url: str,
        *,
        broker_url: str | None,
        detector_seconds: float = 0.0,
        stable_seconds: float = 1.0,
        embedded_workers: int = 0,
        extra_env: dict[str, str] | None = None,
        config_text: str | None = None,
    ) -> None:
        self.tmp = tmp
        self.database_url = database_url
        tmp.mkdir(parents=True, exist_ok=True)
        self.config = tmp / "node.toml"
        self.config.write_text(config_text if config_text is not None else DEFAULT_CONFIG.format(seconds=detector_seconds))
        env = {
            "DICOM_NODE_DATABASE_URL": database_url,
            "DICOM_NODE_STABLE_SECONDS": str(stable_seconds),
            "DICOM_NODE_WORKER__LEASE_SECONDS": str(LEASE_SECONDS),
            "DICOM_NODE_WORKER__RECONCILE_INTERVAL": str(RECONCILE_INTERVAL),
            "DICOM_NODE_WORKER__QUEUED_TIMEOUT": str(QUEUED_TIMEOUT),
            "DICOM_NODE_WORKER__MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "DICOM_NODE_WORKER__EMBEDDED_WORKERS": str(embedded_workers),
            "DICOM_NODE_SCP__RECEIVERS": "1",
            **(extra_env or {}),
        }
        if broker_url:
            env["DICOM_NODE_BROKER_URL"] = broker_url
        self.node = NodeProcess(tmp / "var", env, config=self.config)
        self.workers: list[WorkerProcess] = []
        self.db = Database(database_url)

    def start(self) -> NodeEnv:
        self.node.start()
        return self

    def add_worker(self, name: str = "w1", concurrency: int = 1) -> WorkerProcess:
        worker = WorkerProcess(self.node, name=name, concurrency=concurrency).start()
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for w in self.workers:
            w.kill()
        self.node.stop()
        self.db.dispose()

    def send(self, paths: Iterable[Path]) -> None:
        run = storescu(self.node.dicom_port, list(paths))
        assert run.returncode == 0, run.stdout + run.stderr

    # -- observations -----------------------------------------------------------------------

    def jobs(self) -> list[Job]:
        with self.db.session() as s:
            return list(s.scalars(select(Job).order_by(Job.created_at)))

    def job(self, job_id: str) -> Job:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            return job

    def outputs(self, job_id: str) -> list[Output]:
        with self.db.session() as s:
            return list(s.scalars(select(Output).where(Output.job_id == job_id)))

    def wait_for_jobs(self, count: int, timeout: float = 60) -> list[Job]:
        return wait_until(lambda: (jobs := self.jobs()) and len(jobs) >= count and jobs, timeout, 0.3, f"{count} job(s)")

    def wait_for_state(self, job_id: str, *states: JobState, timeout: float = 90) -> Job:
        wanted = {s.value for s in states}
        return wait_until(lambda: (j := self.job(job_id)).state in wanted and j, timeout, 0.3, f"job state in {sorted(wanted)}")

    def wait_all_terminal(self, count: int, timeout: float = 120) -> list[Job]:
        def done() -> list[Job] | None:
            jobs = self.jobs()
            if len(jobs) >= count and all(JobState(j.state).terminal for j in jobs):
                return jobs
            return None

        try:
            return wait_until(done, timeout, 0.5, f"{count} job(s) in a terminal state")
        except TimeoutError:
            raise TimeoutError(self.diagnostics()) from None

    def assert_every_complete_study_terminal(self) -> None:
        """The no-silent-loss invariant: every completed study has jobs, all in a terminal state,
        and each (study, version, rule, model, re-run generation) exactly once."""
        with self.db.session() as s:
            studies = list(s.scalars(select(Study)))
            jobs = list(s.scalars(select(Job)))
        assert studies, "no study was received"
        for study in studies:
            assert not study.dirty, "a study was never completed"
            mine = [j for j in jobs if j.study_id == study.id]
            assert mine, "a completed study has no job"
            keys = [(j.study_version, j.rule, j.model, j.generation) for j in mine]
            assert len(keys) == len(set(keys)), "a study version got two jobs for the same rule and model"
            for j in mine:
                assert JobState(j.state).terminal, f"job {j.id} is stuck in {j.state}"

    def diagnostics(self) -> str:
        lines = [f"{j.id[:8]} {j.state} attempts={j.attempts} reason={j.reason}" for j in self.jobs()]
        tail = self.node.log()[-3000:]
        wlogs = "\n".join(w.log()[-3000:] for w in self.workers)
        return "\n".join(lines) + "\n--- node log ---\n" + tail + "\n--- worker logs ---\n" + wlogs


def wait_seconds(seconds: float) -> None:
    """Let time pass on purpose (a quiet period, a lease) — never used to wait for an outcome."""
    time.sleep(seconds)


def running_owner_pid(job: Any) -> int:
    """The pid of the process holding a job's lease (``name:pid``)."""
    assert job.lease_owner, "job has no lease holder"
    return int(str(job.lease_owner).rsplit(":", 1)[1])
