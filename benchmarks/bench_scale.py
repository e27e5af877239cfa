"""Scale benchmark: studies per hour with 1, 2, ... worker processes, and the broker's share.

For each worker count in ``--workers`` (default ``1,2``) it runs one round on fresh parts: a
private ``redis-server`` on a free loopback port (the broker), a fresh state database (SQLite in
the node's new data directory, or ``--database postgresql``: a throwaway database on
127.0.0.1:5432, dropped afterwards), ``dicom-node serve`` (no embedded worker, one receiver
process) and that many ``dicom-node worker --concurrency 1`` processes. One routing rule sends
every CT study to ``--model``: the built-in ``lung-nodules`` detector, or ``fingerprint`` (the
plug-in ``tests/plugins/fingerprint.py``: argmax and a hash of the volume, so a job costs what
the node and the worker spend around the model: loading, encoding SEG + SR, delivery, the
hand-offs). Results go to ``--destination``: ``scp`` (default), the minimal durable pynetdicom
Storage SCP of ``benchmarks/minimal_scp.py`` as ``dicom://MINSCP@127.0.0.1:PORT``, or ``none``.

A round sends one study per worker first and waits for their jobs (warm-up: the model is loaded
in each worker child; ``--no-warmup`` skips it), then sends ``--studies`` chest-CT phantoms
(``--slices`` x ``--matrix``, generated once by ``dicom_node.synth`` under
``benchmarks/.cache``, fresh UIDs per study) one association each (DCMTK ``storescu``), back to
back, and waits until every job is terminal. Every figure is read from the state database's
columns (``jobs``, ``outputs``; never the worker's code), so the bench works whether delivery
runs inside the job's task or as a task of its own on the ``delivery`` queue.

Figures per round:

* **studies/h, overall**: studies / (first storescu start -> last job ``finished_at``): what a
  site sees, with sending and the completion quiet period (``--stable-seconds``) in it;
* **studies/h, steady**: studies / (first job ``started_at`` -> last job ``finished_at``);
* mean seconds per job of every stage in ``jobs.timings`` (``load``, ``detect``, ``encode``,
  ``deliver`` when present, ...), of a job (``started_at`` -> ``finished_at``; of which
  outputs stored -> ``finished_at``: the write-back, with its queueing when it is a task of its
  own), of the turnaround (``created_at``, the study complete -> ``finished_at``), of the
  dispatch (``created_at`` -> ``queued_at``: the node's outbox tick and the publish) and the
  queue wait (``queued_at`` -> ``started_at``, whatever its cause);
* **the broker's share**, defined below; worker utilisation = busy / (workers x steady window);
* CPU seconds (user + system, from ``/proc/<pid>/stat``) during the measured phase of
  ``redis-server``, the node (main + receivers), the workers (parents + children), the
  destination SCP, the ``storescu`` senders, and with PostgreSQL its backends for the database.

The broker's share. A job is one or two worker *tasks*:

* the run task: ready at ``queued_at`` (its Celery message was sent), claimed at ``started_at``,
  busy until its outputs are stored (the latest ``outputs.created_at``), or until
  ``finished_at`` when the job has no outputs or no ``deliver`` timing;
* the delivery task, when the job has outputs and ``timings`` has ``deliver``: ready when its
  outputs are stored, claimed at ``finished_at - deliver`` (no column holds its claim; the
  task's few milliseconds of claim bookkeeping before the write-back thus count as hand-off),
  busy until ``finished_at``.

A job a worker claimed before the dispatcher wrote its ``queued_at`` (the two race; the
dispatcher then leaves it unset) is ready at ``started_at``: hand-off 0, counted apart.

Tasks are replayed in claim order over W worker slots (W = worker processes, concurrency 1):
each task takes the slot that became free earliest, at ``free``. Its **hand-off latency** is
``claim - max(ready, free)``, at least 0: the time it waited although it was ready and a worker
was free, i.e. excluding the time it waited because every worker was busy. That is the broker
round trip (publish, Redis, the worker's consumer, the prefork pool's hand-off to the child)
plus the claim transaction in the state database; for the delivery task also the node's outbox
tick, which sends its message. Where delivery runs inside the run task the delivery
"hand-off" is only the step between storing the outputs and starting the write-back (no broker
round trip); it is printed apart from the run task's so it can be read either way.

    broker share = sum of hand-off latencies / (sum of busy times + sum of hand-off latencies)

summed over the measured jobs' tasks. A task claimed while the replay has every slot busy
would mean the columns disagree with W slots; it is counted (``overlaps``) and given 0.

The comparison line gives the speed-up of each worker count over the first (steady and overall
rates) next to the ideal on this machine, min(workers, cores) / min(first count, cores): the
ideal for jobs that use one core each. ``lung-nodules`` runs torch with one thread per core
unless ``--threads`` sets its ``threads`` option, so one worker already uses more than one core
while it detects, and two workers on two cores gain less than that ideal (the row "worker CPU s
per busy s" shows how many cores a busy worker used). The node, Redis, the senders and anything
else on the machine share the same cores: the load average is printed per round. The run
exits 1 when a storescu run fails, a study is lost (not indexed, fewer instances than sent, no
job or more than one), a job does not end ``done``, a delivery does not end ``done``, or
``--max-seconds`` (the bound on the whole run) is reached; 2 when a tool is missing.

    .venv/bin/python benchmarks/bench_scale.py                      # 12 studies, 1 and 2 workers
    .venv/bin/python benchmarks/bench_scale.py --model fingerprint --studies 30 --json
    .venv/bin/python benchmarks/bench_scale.py --studies 2 --slices 40 --matrix 128  # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import math
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import bench_ingest, bench_soak  # noqa: E402
from tests.peers import NodeProcess, RedisServer, WorkerProcess, storescu, wait_until  # noqa: E402

AET = "AINODE"
MODELS: dict[str, str | None] = {
    "lung-nodules": None,  # the built-in entry point
    "fingerprint": "tests.plugins.fingerprint:FingerprintDetector",
}
"""Model name -> plug-in (``module:attribute``) for those that are not installed."""
TERMINAL = ("done", "failed", "skipped", "cancelled")
PG_ADMIN_URL = os.environ.get(
    "DICOM_NODE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
"""The same server and variable as the test suite's PostgreSQL fixtures (tests/conftest.py)."""


class HardLimit(BaseException):
    """Raised in the main thread when --max-seconds is up."""


def _on_alarm(_signum: int, _frame: FrameType | None) -> None:
    raise HardLimit


def log(message: str) -> None:
    """Progress goes to stderr, so that stdout holds only the figures (or the JSON)."""
    print(message, file=sys.stderr, flush=True)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- the state database (read-only, columns only) ------------------------------------------------


def _epoch(value: Any) -> float | None:
    """A state-database time (naive UTC; text on SQLite) as seconds since the epoch."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


@dataclass
class JobRow:
    id: str
    study_uid: str
    state: str
    reason: str | None
    created: float
    queued: float | None
    started: float | None
    finished: float | None
    timings: dict[str, float]
    outputs_stored: float | None
    """The latest ``outputs.created_at``: the results are stored, delivery can begin."""
    deliveries: list[str] = field(default_factory=list)
    """States of the job's ``deliveries`` rows."""


class StateDb:
    """Plain SQL on the node's state database (SQLite or PostgreSQL), through SQLAlchemy."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.sa = sa
        self.engine = sa.create_engine(url)

    def close(self) -> None:
        self.engine.dispose()

    def studies(self) -> dict[str, tuple[int, int]]:
        """Study Instance UID -> (instances indexed, jobs)."""
        text = self.sa.text
        with self.engine.connect() as conn:
            counts = {
                sid: int(n)
                for sid, n in conn.execute(
                    text("SELECT study_id, COUNT(*) FROM instances GROUP BY study_id")
                )
            }
            jobs = {
                sid: int(n)
                for sid, n in conn.execute(
                    text("SELECT study_id, COUNT(*) FROM jobs GROUP BY study_id")
                )
            }
            rows = conn.execute(text("SELECT id, study_instance_uid FROM studies")).all()
        return {uid: (counts.get(sid, 0), jobs.get(sid, 0)) for sid, uid in rows}

    def terminal(self, uids: set[str]) -> int:
        """How many of these studies have a job in a terminal state."""
        text = self.sa.text
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT s.study_instance_uid, j.state FROM jobs j "
                    "JOIN studies s ON s.id = j.study_id"
                )
            )
            return sum(1 for uid, state in rows if uid in uids and state in TERMINAL)

    def jobs(self, uids: set[str]) -> list[JobRow]:
        text = self.sa.text
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT j.id, s.study_instance_uid, j.state, j.reason, j.created_at, "
                    "j.queued_at, j.started_at, j.finished_at, j.timings "
                    "FROM jobs j JOIN studies s ON s.id = j.study_id"
                )
            )
            out = {
                r[0]: JobRow(
                    id=r[0],
                    study_uid=r[1],
                    state=r[2],
                    reason=r[3],
                    created=_epoch(r[4]) or 0.0,
                    queued=_epoch(r[5]),
                    started=_epoch(r[6]),
                    finished=_epoch(r[7]),
                    timings={k: float(v) for k, v in (_json(r[8]) or {}).items()},
                    outputs_stored=None,
                )
                for r in rows
                if r[1] in uids
            }
            for job_id, created in conn.execute(
                text("SELECT job_id, MAX(created_at) FROM outputs GROUP BY job_id")
            ):
                if job_id in out:
                    out[job_id].outputs_stored = _epoch(created)
            for job_id, state in conn.execute(text("SELECT job_id, state FROM deliveries")):
                if job_id in out:
                    out[job_id].deliveries.append(state)
        return sorted(out.values(), key=lambda j: j.created)


@contextlib.contextmanager
def database(kind: str) -> Iterator[str | None]:
    """Yields the DATABASE_URL for the node: None (SQLite in its data directory) or a
    throwaway PostgreSQL database, dropped on the way out."""
    if kind == "sqlite":
        yield None
        return
    import sqlalchemy as sa

    name = f"dn_bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        admin.dispose()


# -- CPU -----------------------------------------------------------------------------------------


def tree_cpu(pid: int | None) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    return bench_ingest.cpu_seconds(bench_ingest._descendants(pid)) if pid else 0.0


def postgres_backends(dbname: str | None) -> dict[int, float]:
    """CPU seconds of each PostgreSQL backend serving ``dbname`` (its title names the database)."""
    if not dbname:
        return {}
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            title = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            if title.startswith("postgres: ") and f" {dbname} " in title:
                out[int(entry)] = bench_ingest.cpu_seconds([int(entry)])
    return out


def senders_cpu() -> float:
    """CPU of this process's reaped children: the storescu runs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the broker's share --------------------------------------------------------------------------


@dataclass
class Task:
    kind: str  # "run" | "deliver"
    ready: float
    claim: float
    end: float


def tasks_of(job: JobRow) -> list[Task]:
    """The worker tasks of a finished job (see the module docstring)."""
    assert job.started is not None and job.finished is not None
    ready = job.queued if job.queued is not None else job.started
    deliver = job.timings.get("deliver")
    if job.outputs_stored is None or deliver is None:
        return [Task("run", ready, job.started, job.finished)]
    stored = min(max(job.outputs_stored, job.started), job.finished)
    deliver_claim = max(job.finished - deliver, stored)
    return [
        Task("run", ready, job.started, stored),
        Task("deliver", stored, deliver_claim, job.finished),
    ]


@dataclass
class Handoffs:
    latency: dict[str, list[float]]
    busy: float
    overlaps: int

    @property
    def total(self) -> float:
        return sum(sum(v) for v in self.latency.values())

    @property
    def share(self) -> float:
        return self.total / (self.busy + self.total) if self.busy + self.total > 0 else 0.0


def replay(jobs: list[JobRow], slots: int) -> Handoffs:
    """Hand-off latencies: tasks in claim order over ``slots`` workers (module docstring)."""
    tasks = sorted((t for j in jobs for t in tasks_of(j)), key=lambda t: t.claim)
    free = [-math.inf] * slots
    latency: dict[str, list[float]] = defaultdict(list)
    busy = 0.0
    overlaps = 0
    for task in tasks:
        earliest = heapq.heappop(free)
        if earliest > task.claim + 0.01:  # 10 ms: timestamps of two processes
            overlaps += 1
            latency[task.kind].append(0.0)
        else:
            latency[task.kind].append(max(0.0, task.claim - max(task.ready, earliest)))
        busy += task.end - task.claim
        heapq.heappush(free, max(task.end, task.claim))
    return Handoffs(dict(latency), busy, overlaps)


# -- one round -----------------------------------------------------------------------------------


def write_config(path: Path, model: str, threads: int | None) -> None:
    """One rule: every CT study runs ``model`` (with ``threads`` torch threads when given)."""
    text = f'[[routes]]\nname = "scale"\nmodality = ["CT"]\nmodels = ["{model}"]\n'
    plugin = MODELS[model]
    if plugin:
        text += f'\n[models.{model}]\nplugin = "{plugin}"\n'
    if threads:
        text += f"\n[models.{model}.options]\nthreads = {threads}\n"
    path.write_text(text)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


@dataclass
class Round:
    workers: int
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def send_studies(
    template: bench_soak.StudyTemplate, count: int, port: int, folder: Path, deadline: float
) -> tuple[dict[str, int], list[str], float]:
    """``count`` new studies, one storescu association each, back to back.

    Returns (Study Instance UID -> instances sent, failures, start time)."""
    sent: dict[str, int] = {}
    failures: list[str] = []
    started = 0.0
    for i in range(count):
        if time.monotonic() > deadline:
            failures.append(f"--max-seconds reached after sending {i} of {count} studies")
            break
        uid = bench_soak.new_uid()
        paths = template.instantiate(folder / f"s{i:03d}", uid, run_model=True)
        started = started or time.time()
        run = storescu(port, paths, aet=AET, calling="BENCH")
        shutil.rmtree(folder / f"s{i:03d}", ignore_errors=True)
        if run.returncode != 0 or "E:" in run.stderr:
            failures.append(f"storescu exited {run.returncode}: {run.stderr.strip()[-300:]}")
            continue
        sent[uid] = len(paths)
    return sent, failures, started


def wait_terminal(db: StateDb, uids: set[str], deadline: float, what: str) -> bool:
    """Poll until every study in ``uids`` has a terminal job; False at the deadline."""
    last = -1
    while time.monotonic() < deadline:
        done = db.terminal(uids)
        if done != last:
            log(f"  {what}: {done}/{len(uids)} jobs terminal")
            last = done
        if done >= len(uids):
            return True
        time.sleep(1.0)
    return False


def check(db: StateDb, sent: dict[str, int], jobs: list[JobRow], scp: bool) -> list[str]:
    """No study lost: indexed with every instance, exactly one job, done, delivered."""
    failures: list[str] = []
    studies = db.studies()
    for uid, n in sent.items():
        got = studies.get(uid)
        if got is None:
            failures.append(f"a study sent ({n} instances) is not in the state database")
        elif got[0] != n:
            failures.append(f"a study has {got[0]} instances indexed, {n} sent")
        elif got[1] != 1:
            failures.append(f"a study has {got[1]} jobs, expected 1")
    for job in jobs:
        if job.state != "done":
            failures.append(f"job {job.id} ended {job.state}: {job.reason}")
        bad = [s for s in job.deliveries if s != "done"]
        if bad or (scp and not job.deliveries):
            failures.append(f"job {job.id}: deliveries {job.deliveries or 'none'}")
    return failures


def run_round(
    args: argparse.Namespace, workers: int, template: bench_soak.StudyTemplate, work: Path
) -> Round:
    result = Round(workers)
    deadline = args.deadline
    work.mkdir(parents=True)
    config = work / "node.toml"
    write_config(config, args.model, args.threads)
    redis = RedisServer(work / "redis").start()
    scp: bench_ingest.MinimalScpReceiver | None = None
    node: NodeProcess | None = None
    procs: list[WorkerProcess] = []
    db: StateDb | None = None
    with database(args.database) as db_url:
        try:
            env = {
                "DICOM_NODE_AE_TITLE": AET,
                "DICOM_NODE_BROKER_URL": redis.url,
                "DICOM_NODE_STABLE_SECONDS": str(args.stable_seconds),
                "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0",
                "DICOM_NODE_SCP__RECEIVERS": "1",
                "DICOM_NODE_SCP__MIN_FREE_BYTES": str(256 * 2**20),
                "DICOM_NODE_LOG__LEVEL": "WARNING",
            }
            if db_url:
                env["DICOM_NODE_DATABASE_URL"] = db_url
            if args.destination == "scp":
                scp = bench_ingest.MinimalScpReceiver(work / "scp")
                scp.start()
                env["DICOM_NODE_DESTINATION"] = f"dicom://{scp.aet}@127.0.0.1:{scp.port}"
            node = NodeProcess(work / "var", env, config=config).start()
            db = StateDb(db_url or f"sqlite:///{node.data_dir / 'state.sqlite'}")
            procs = [
                WorkerProcess(node, name=f"w{i + 1}", concurrency=1).start() for i in range(workers)
            ]
            wait_workers(redis.url, workers, procs, min(deadline, time.monotonic() + 180))
            if args.warmup:
                uids, failures, _ = send_studies(
                    template, workers, node.dicom_port, work / "send", deadline
                )
                result.failures += failures
                if not wait_terminal(db, set(uids), deadline, "warm-up"):
                    result.failures.append("--max-seconds reached during the warm-up")
                    return result
                result.failures += [
                    "warm-up: " + f for f in check(db, uids, db.jobs(set(uids)), scp is not None)
                ]
            assert node.proc is not None and redis.proc is not None
            pids = {
                "redis": [redis.proc.pid],
                "node": [node.proc.pid],
                "workers": [p.proc.pid for p in procs if p.proc],
                "destination": [scp.proc.pid] if scp and scp.proc else [],
            }
            dbname = db_url.rsplit("/", 1)[1] if db_url else None
            cpu0 = {k: sum(tree_cpu(p) for p in v) for k, v in pids.items()}
            cpu0["senders"] = senders_cpu()
            pg0 = postgres_backends(dbname)
            load0 = loadavg()

            log(f"  sending {args.studies} studies")
            sent, failures, t_send = send_studies(
                template, args.studies, node.dicom_port, work / "send", deadline
            )
            result.failures += failures
            t_sent = time.time()
            finished = wait_terminal(db, set(sent), deadline, "measured")
            cpu1 = {k: sum(tree_cpu(p) for p in v) for k, v in pids.items()}
            cpu1["senders"] = senders_cpu()
            pg1 = postgres_backends(dbname)
            jobs = db.jobs(set(sent))
            if not finished:
                result.failures.append(
                    f"--max-seconds reached with {len(sent) - db.terminal(set(sent))} of "
                    f"{len(sent)} jobs not terminal"
                )
            result.failures += check(db, sent, jobs, scp is not None)
            cpu = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu1}
            if dbname:
                cpu["postgresql"] = round(sum(v - pg0.get(pid, 0.0) for pid, v in pg1.items()), 2)
            result.figures = figures(
                jobs, workers, t_send, t_sent, cpu, len(sent), load0, loadavg()
            )
            if scp is not None:
                result.figures["objects_received"] = scp.count()
            for p in procs:
                if p.proc is not None and p.proc.poll() is not None:
                    result.failures.append(f"worker {p.name} exited ({p.proc.returncode})")
        finally:
            for p in procs:
                p.stop()
            if node is not None:
                code = node.stop()
                if code not in (0, None):
                    result.failures.append(f"dicom-node serve stopped with status {code}")
            if db is not None:
                db.close()
            if scp is not None:
                scp.stop()
            redis.stop()
    return result


def wait_workers(broker: str, count: int, procs: list[WorkerProcess], deadline: float) -> None:
    """Until ``count`` workers answer a Celery ping over the broker (their consumers are up)."""
    from celery import Celery

    app = Celery("bench-scale", broker=broker, set_as_current=False)
    try:

        def ready() -> bool:
            for p in procs:
                if p.proc is not None and p.proc.poll() is not None:
                    raise RuntimeError(f"worker {p.name} exited:\n{p.log()[-2000:]}")
            return len(app.control.ping(timeout=1.0) or []) >= count

        wait_until(ready, max(1.0, deadline - time.monotonic()), 0.5, f"{count} worker(s)")
    finally:
        app.close()


def figures(
    jobs: list[JobRow],
    workers: int,
    t_send: float,
    t_sent: float,
    cpu: dict[str, float],
    studies: int,
    load0: str,
    load1: str,
) -> dict[str, Any]:
    """The round's figures (module docstring) from its jobs' columns."""
    done = [j for j in jobs if j.started is not None and j.finished is not None]
    if not done:
        return {"workers": workers, "studies": studies, "jobs_finished": 0}
    # (created, queued, started, finished) of the finished jobs, queued None when a worker
    # claimed the job before the dispatcher had written queued_at.
    times = [(j.created, j.queued, j.started or 0.0, j.finished or 0.0) for j in done]
    first_start = min(t[2] for t in times)
    last_finish = max(t[3] for t in times)
    overall = last_finish - t_send
    steady = last_finish - first_start
    stages: dict[str, list[float]] = defaultdict(list)
    for j in done:
        for name, seconds in j.timings.items():
            stages[name].append(seconds)
    handoffs = replay(done, workers)
    queued = [(c, q, st) for c, q, st, _f in times if q is not None]
    stored = [
        (j.outputs_stored, j.finished)
        for j in done
        if j.outputs_stored is not None and j.finished is not None
    ]
    return {
        "workers": workers,
        "studies": studies,
        "jobs_finished": len(done),
        "send_seconds": round(t_sent - t_send, 2),
        "overall_seconds": round(overall, 2),
        "steady_seconds": round(steady, 2),
        "studies_per_hour_overall": round(3600 * len(done) / overall, 1),
        "studies_per_hour_steady": round(3600 * len(done) / steady, 1) if steady > 0 else None,
        "stage_mean_seconds": {k: round(_mean(v), 3) for k, v in sorted(stages.items())},
        "job_mean_seconds": round(_mean([f - st for _c, _q, st, f in times]), 3),
        "turnaround_mean_seconds": round(_mean([f - c for c, _q, _st, f in times]), 3),
        "stored_to_finished_mean_seconds": round(_mean([f - o for o, f in stored]), 3),
        "dispatch_mean_seconds": round(_mean([q - c for c, q, _st in queued]), 3),
        "queue_wait_mean_seconds": round(_mean([st - q for _c, q, st in queued]), 3),
        "claimed_before_queued_at": len(done) - len(queued),
        "handoff_mean_seconds": {k: round(_mean(v), 4) for k, v in handoffs.latency.items()},
        "handoff_seconds": round(handoffs.total, 3),
        "busy_seconds": round(handoffs.busy, 2),
        "broker_share": round(handoffs.share, 4),
        "overlaps": handoffs.overlaps,
        "utilisation": round(handoffs.busy / (workers * steady), 3) if steady > 0 else None,
        "cpu_seconds": cpu,
        "load_before": load0,
        "load_after": load1,
    }


# -- output --------------------------------------------------------------------------------------


def table(rounds: list[Round], meta: dict[str, Any]) -> str:
    """The figures as a plain-text table, one column per round, and the comparison lines."""
    rows: list[tuple[str, list[str]]] = []
    figs = [r.figures for r in rounds]

    def row(label: str, fn: Any) -> None:
        cells = []
        for f in figs:
            try:
                cells.append(fn(f))
            except (KeyError, TypeError):
                cells.append("-")
        rows.append((label, cells))

    row("worker processes (concurrency 1)", lambda f: str(f["workers"]))
    row("jobs finished", lambda f: f"{f['jobs_finished']}/{f['studies']}")
    row("studies/h, overall (send -> last done)", lambda f: f"{f['studies_per_hour_overall']:.0f}")
    row(
        "studies/h, steady (first start -> last done)",
        lambda f: f"{f['studies_per_hour_steady']:.0f}",
    )
    row(
        "  windows: send / overall / steady, s",
        lambda f: (
            f"{f['send_seconds']:.0f} / {f['overall_seconds']:.0f} / {f['steady_seconds']:.0f}"
        ),
    )
    stage_names = sorted({k for f in figs for k in f.get("stage_mean_seconds", {})})
    for name in stage_names:
        row(f"stage {name}, mean s", lambda f, n=name: f"{f['stage_mean_seconds'][n]:.2f}")
    row("job start -> finish, mean s", lambda f: f"{f['job_mean_seconds']:.2f}")
    row(
        "  of which outputs stored -> finish, mean s",
        lambda f: f"{f['stored_to_finished_mean_seconds']:.2f}",
    )
    row(
        "job created -> finish (turnaround), mean s",
        lambda f: f"{f['turnaround_mean_seconds']:.2f}",
    )
    row("dispatch (created -> queued), mean s", lambda f: f"{f['dispatch_mean_seconds']:.3f}")
    row("queue wait (queued -> started), mean s", lambda f: f"{f['queue_wait_mean_seconds']:.2f}")
    for kind in ("run", "deliver"):
        row(
            f"hand-off latency, {kind} task, mean ms",
            lambda f, k=kind: f"{1000 * f['handoff_mean_seconds'][k]:.1f}",
        )
    row("claimed before queued_at was written", lambda f: str(f["claimed_before_queued_at"]))
    row("replay overlaps (0 when consistent)", lambda f: str(f["overlaps"]))
    row("broker share", lambda f: f"{100 * f['broker_share']:.2f} %")
    row("worker utilisation (steady window)", lambda f: f"{100 * f['utilisation']:.0f} %")
    for name in ("redis", "node", "workers", "destination", "senders", "postgresql"):
        if any(name in f.get("cpu_seconds", {}) for f in figs):
            row(f"CPU s, {name}", lambda f, n=name: f"{f['cpu_seconds'][n]:.2f}")
    row(
        "worker CPU s per busy s",
        lambda f: f"{f['cpu_seconds']['workers'] / f['busy_seconds']:.2f}",
    )
    row(
        "CPU s per study, workers",
        lambda f: f"{f['cpu_seconds']['workers'] / f['jobs_finished']:.2f}",
    )
    row(
        "load average before / after",
        lambda f: f"{f['load_before'].split()[0]} / {f['load_after'].split()[0]}",
    )

    width = max(len(label) for label, _ in rows) + 2
    cols = [max(12, *(len(cells[i]) + 2 for _, cells in rows)) for i in range(len(figs))]
    lines = [
        f"model {meta['model']}, {meta['studies']} studies of {meta['slices']} x "
        f"{meta['matrix']}^2 ({meta['study_mb']:.1f} MB), database {meta['database']}, "
        f"destination {meta['destination']}, torch threads {meta['threads'] or 'default'}, "
        f"broker redis-server, {meta['cores']} cores",
    ]
    for label, cells in rows:
        lines.append(
            label.ljust(width) + "".join(c.rjust(w) for c, w in zip(cells, cols, strict=True))
        )
    lines += comparison(rounds, meta["cores"])
    return "\n".join(lines)


def comparison(rounds: list[Round], cores: int) -> list[str]:
    """Speed-up of every round over the first, next to the ideal on this machine."""
    base = rounds[0].figures if rounds else {}
    out = []
    for r in rounds[1:]:
        f = r.figures
        try:
            steady = f["studies_per_hour_steady"] / base["studies_per_hour_steady"]
            overall = f["studies_per_hour_overall"] / base["studies_per_hour_overall"]
        except (KeyError, TypeError, ZeroDivisionError):
            continue
        ideal = min(r.workers, cores) / min(rounds[0].workers, cores)
        out.append(
            f"speed-up {r.workers} vs {rounds[0].workers} workers: {steady:.2f}x steady, "
            f"{overall:.2f}x overall; ideal on this machine ({cores} cores) {ideal:.2f}x"
        )
    return out


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=12, help="measured studies per round")
    parser.add_argument(
        "--workers", default="1,2", help="comma-separated worker counts, one round each"
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="lung-nodules")
    parser.add_argument("--slices", type=int, default=100, help="slices per study (1.25 mm)")
    parser.add_argument("--matrix", type=int, default=512, help="rows = columns")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per lung-nodules run (its 'threads' option; default: torch's, "
        "one per core)",
    )
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--destination", choices=("scp", "none"), default="scp")
    parser.add_argument(
        "--stable-seconds", type=float, default=2.0, help="DICOM_NODE_STABLE_SECONDS"
    )
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument(
        "--max-seconds", type=float, default=3600.0, help="bound on the whole run (exit 1)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the figures as JSON on stdout (table on stderr)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.workers.split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.studies < 1:
        parser.error("--workers needs counts >= 1 and --studies >= 1")
    for tool in ("storescu", "redis-server"):
        if shutil.which(tool) is None:
            print(f"{tool} not found; run scripts/bootstrap --test", file=sys.stderr)
            return 2

    cores = os.cpu_count() or 1
    args.deadline = time.monotonic() + args.max_seconds
    signal.signal(signal.SIGALRM, _on_alarm)
    # The rounds stop at the deadline themselves; the alarm is the backstop for a hung call.
    signal.alarm(int(args.max_seconds) + 120)
    log(f"cores: {cores}; load: {loadavg()}; bound {args.max_seconds:.0f} s")
    # 1.25 mm slices: inside the detector's validated input range (0.6-0.8 mm pixels at the
    # default 512 matrix), so every job really runs the model instead of being skipped.
    template = bench_soak.load_template(args.slices, args.matrix, slice_thickness=1.25)
    meta = {
        "model": args.model,
        "studies": args.studies,
        "slices": args.slices,
        "matrix": args.matrix,
        "study_mb": template.nbytes / 1e6,
        "database": args.database,
        "destination": args.destination,
        "threads": args.threads,
        "cores": cores,
        "warmup": args.warmup,
        "stable_seconds": args.stable_seconds,
    }
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rounds: list[Round] = []
    failures: list[str] = []
    try:
        for count in counts:
            log(f"round: {count} worker(s), load {loadavg()}")
            r = run_round(args, count, template, work / f"w{count}-{len(rounds)}")
            rounds.append(r)
            failures += [f"{count} worker(s): {f}" for f in r.failures]
            if r.failures:
                break
    except HardLimit:
        failures.append(f"--max-seconds ({args.max_seconds:.0f} s) reached")
    except Exception as exc:  # a part that did not start: report it after the rounds so far
        traceback.print_exc()
        failures.append(f"{type(exc).__name__}: {str(exc)[:300]}")
    finally:
        signal.alarm(0)
        if args.keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = table(rounds, meta) if rounds else "no round finished"
    if args.json:
        log(text)
        document = {
            **meta,
            "rounds": [r.figures for r in rounds],
            "comparison": comparison(rounds, cores),
            "failures": failures,
        }
        print(json.dumps(document, indent=2))
    else:
        print(text)
    if failures:
        log("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
