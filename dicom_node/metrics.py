"""Prometheus metrics: receiver counters across processes, job metrics from the state database.

Two sources, one ``/metrics`` page:

* **Receiver counters** (instances and bytes received, C-STORE statuses, associations) are
  counted where they happen, in the receiver processes. ``dicom-node serve`` runs several of
  them, so they use prometheus_client's multiprocess mode: each process writes its values to
  memory-mapped files in one directory, and the HTTP process adds them up at scrape time.
  :func:`prepare_multiprocess` must run before anything imports ``prometheus_client`` (the mode
  is chosen at import); this module therefore imports it only inside functions.
* **Job metrics** (jobs by state, queue depth, stage latency histograms, deliveries, inference
  time and positive rate per model and model version) come from the state database when
  Prometheus scrapes, by :class:`StateCollector`: the database is the source of truth, and
  workers may run on other machines where no counter of ours could be read.
* **Health gauges** for alerting (free disk space, destination up/down, the oldest waiting job
  and queue age per priority) come from :mod:`dicom_node.alerts.health`, the same functions the
  alert monitor uses for its webhooks.

Metric names start with ``dicom_node_`` and carry their unit (``_seconds``, ``_bytes``);
counters end in ``_total``. No label ever holds patient data: labels are DIMSE status codes,
outcomes, job states, model names and versions, queue names, priorities and destination names
from the settings.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache, wraps
from pathlib import Path
from typing import Any

from dicom_node.dimse_status import category

LOGGER = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "dicom_node"

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
"""Upper bounds (s) for per-stage job latency: from a cached load (tens of ms) to a slow CPU
inference or a delivery with retries (minutes)."""

TURNAROUND_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
"""Upper bounds (s) from job creation (study complete) to its terminal state."""

MAX_VERSIONS_PER_MODEL = 8
"""Model versions kept per model in the per-version series (the most recently finished ones):
a version is one weights update, so this bounds the label set of a model updated for years."""

FINISHED_LOOKBACK = timedelta(minutes=10)
"""Finished jobs are read incrementally; each scrape looks this far behind the newest
``finished_at`` seen, so a job whose worker's clock lags or whose commit landed late is still
counted (once: jobs already counted are remembered for this long)."""


# -- multiprocess set-up (dicom-node serve) ----------------------------------------------------


def prepare_multiprocess(data_dir: Path) -> Path:
    """Give this node run a fresh metrics directory and export it to child processes.

    Call in ``dicom-node serve`` before ``prometheus_client`` is imported and before receiver
    processes are spawned (they inherit the environment). Each run gets ``metrics/run-<pid>``:
    a second node started by mistake on the same data directory (refused later by the data
    directory lock) cannot wipe the running node's files; directories of runs whose process is
    gone are removed here.
    """
    if "prometheus_client" in sys.modules and MULTIPROC_ENV not in os.environ:
        LOGGER.warning(
            "prometheus_client was imported before the metrics directory was set; receiver "
            "metrics from other processes may be missing"
        )
    root = Path(data_dir) / "metrics"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("run-*"):
        pid = old.name.removeprefix("run-")
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    run_dir = root / f"run-{os.getpid()}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    os.environ[MULTIPROC_ENV] = str(run_dir)
    return run_dir


def multiprocess_dir() -> Path | None:
    """The metrics directory of this node run, if multiprocess mode is on."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def forget_dead_processes(path: Path) -> None:
    """Drop the live-gauge files of processes that have exited (a receiver that crashed).

    prometheus_client only does this when told (``mark_process_dead``); doing it at scrape time
    keeps ``dicom_node_associations_active`` from counting associations of a dead process.
    """
    from prometheus_client import multiprocess

    pids: set[int] = set()
    for f in path.glob("gauge_live*_*.db"):
        digits = f.stem.rsplit("_", 1)[-1]
        if digits.isdigit():
            pids.add(int(digits))
    for pid in pids:
        if not _pid_alive(pid):
            multiprocess.mark_process_dead(pid, str(path))


# -- receiver side: counted in the process where it happens -------------------------------------

_CREATING = threading.RLock()


def created_once(factory: Callable[..., Any]) -> Callable[..., Any]:
    """``functools.cache`` under one lock, for functions that create prometheus_client metrics.

    A receiver process first touches its counters from whichever association thread comes first,
    possibly two at once (a rejection and the next acceptance); an unlocked cache let both create
    the counters, and the second creation's duplicate-registration error lost that event's count."""
    cached = cache(factory)

    @wraps(factory)
    def once(*args: Any) -> Any:
        with _CREATING:
            return cached(*args)

    return once


@dataclass
class _ReceiverMetrics:
    instances: Any
    bytes: Any
    statuses: Any
    associations: Any
    active: Any
    live: set[threading.Thread] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


@created_once
def _receiver_metrics() -> _ReceiverMetrics:
    from prometheus_client import Counter, Gauge

    return _ReceiverMetrics(
        instances=Counter(
            f"{PREFIX}_received_instances",
            "DICOM instances stored (C-STORE or STOW-RS answered with success).",
            ["source"],
        ),
        bytes=Counter(
            f"{PREFIX}_received_bytes",
            "Bytes of DICOM instances stored.",
            ["source"],
        ),
        statuses=Counter(
            f"{PREFIX}_cstore_responses",
            "C-STORE responses sent, by DIMSE status (hex) and its category.",
            ["status", "outcome"],
        ),
        associations=Counter(
            f"{PREFIX}_associations",
            "DICOM associations requested, by outcome (accepted or rejected).",
            ["outcome"],
        ),
        active=Gauge(
            f"{PREFIX}_associations_active",
            "DICOM associations open now, over all receiver processes.",
            multiprocess_mode="livesum",
        ),
    )


def status_outcome(status: int) -> str:
    """The category of a C-STORE status (PS3.4 Annex B.2.3): success, warning or failure."""
    return category(status).value


@created_once
def _status_counter(status: int) -> Any:
    # Labelled children are looked up once per status, not three times per instance.
    return _receiver_metrics().statuses.labels(
        status=f"0x{status:04X}", outcome=status_outcome(status)
    )


@created_once
def _source_counters(source: str) -> tuple[Any, Any]:
    m = _receiver_metrics()
    return m.instances.labels(source=source), m.bytes.labels(source=source)


def observe_instance(source: str, status: int, size: int) -> None:
    """Count one stored-or-refused instance. ``source`` is ``dimse`` or ``stow``."""
    if source == "dimse":
        _status_counter(status).inc()
    if status_outcome(status) != "failure":
        instances, stored_bytes = _source_counters(source)
        instances.inc()
        if size > 0:
            stored_bytes.inc(size)


@created_once
def _pull_metrics() -> tuple[Any, Any]:
    from prometheus_client import Counter

    return (
        Counter(
            f"{PREFIX}_pull_runs",
            "Runs of the [[pull]] schedules (dicom_node.backfill), by outcome.",
            ["pull", "outcome"],
        ),
        Counter(
            f"{PREFIX}_pull_studies",
            "Studies a [[pull]] schedule brought to the node (pulled without a failure).",
            ["pull"],
        ),
    )


def observe_pull(name: str, outcome: str, studies: int) -> None:
    """Count one run of the ``[[pull]]`` schedule ``name``: ``success`` or ``failure``."""
    runs, pulled = _pull_metrics()
    runs.labels(pull=name, outcome=outcome).inc()
    pulled.labels(pull=name).inc(studies)


def observe_association(what: str) -> None:
    """``accepted``, ``rejected`` or ``closed`` (released or aborted).

    pynetdicom runs each association in its own thread and fires its accepted/released events
    there, so the open associations are the accepted threads that are still alive. Tracking
    threads (not +1/-1) keeps the gauge right when an association is aborted before it was
    accepted, aborted twice, or aborted from another thread at shutdown.
    """
    m = _receiver_metrics()
    if what in ("accepted", "rejected"):
        m.associations.labels(outcome=what).inc()
    with m.lock:
        if what == "accepted":
            m.live.add(threading.current_thread())
        elif what == "closed":
            m.live.discard(threading.current_thread())
        m.live = {t for t in m.live if t.is_alive()}
        m.active.set(len(m.live))


def receiver_observer(kind: str, value: Any, amount: int) -> None:
    """The hook ``dicom_node.service`` registers on each :class:`~dicom_node.scp.server.Receiver`.

    ``kind`` is ``status`` (value: the DIMSE status, amount: bytes stored) or ``association``
    (value: accepted, rejected or closed). Never raises: metrics must not fail a C-STORE.
    """
    try:
        if kind == "status":
            observe_instance("dimse", int(value), int(amount))
        elif kind == "association":
            observe_association(str(value))
    except Exception:  # pragma: no cover - defensive: a full disk must not fail the store
        LOGGER.debug("metrics observer failed", exc_info=True)


# -- job side: read from the state database at scrape time --------------------------------------


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        out = [(_bound_label(b), float(c)) for b, c in zip(self.bounds, self.counts, strict=True)]
        out.append(("+Inf", float(self.count)))
        return out


def _bound_label(bound: float) -> str:
    return repr(float(bound)) if not math.isinf(bound) else "+Inf"


@dataclass
class _Finished:
    """Cumulative observations of finished jobs, built incrementally across scrapes."""

    stages: dict[str, _Histogram] = field(default_factory=dict)
    turnaround: dict[tuple[str, str], _Histogram] = field(default_factory=dict)
    inference: dict[tuple[str, str], _Histogram] = field(default_factory=dict)
    finished: dict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))
    results: dict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))
    versions: dict[tuple[str, str], datetime] = field(default_factory=dict)
    """(model, version) -> newest finish seen, to keep :data:`MAX_VERSIONS_PER_MODEL`."""
    seen: dict[str, datetime] = field(default_factory=dict)
    watermark: datetime | None = None

    def forget_old_versions(self) -> None:
        """Drop the series of all but the newest :data:`MAX_VERSIONS_PER_MODEL` versions of
        each model."""
        by_model: dict[str, list[tuple[datetime, str]]] = defaultdict(list)
        for (model, version), last in self.versions.items():
            by_model[model].append((last, version))
        old = {
            (model, version)
            for model, seen in by_model.items()
            for _, version in sorted(seen, reverse=True)[MAX_VERSIONS_PER_MODEL:]
        }
        if not old:
            return
        for table in (self.turnaround, self.inference, self.finished, self.results):
            for key in [k for k in table if (k[0], k[1]) in old]:
                del table[key]  # type: ignore[arg-type]
        for key in old:
            del self.versions[key]


class StateCollector:
    """A prometheus_client collector over the state database.

    Gauges (jobs by state, queue depth, deliveries) are aggregate queries run at each scrape;
    they use the ``ix_jobs_state`` index and stay cheap on a large table. Histograms and
    per-model counters over *finished* jobs are accumulated incrementally: the first scrape
    reads every finished job once, later scrapes only those finished since (see
    :data:`FINISHED_LOOKBACK`), so the cost of a scrape does not grow with years of history.
    """

    def __init__(self, db: Any, settings: Any = None) -> None:
        self.db = db
        self.settings = settings
        """:class:`~dicom_node.settings.Settings`, for the health gauges (disks, configured
        destinations); without it only what the database knows is reported."""
        self._lock = threading.Lock()
        self._finished = _Finished()

    def describe(self) -> list[Any]:
        # Returning nothing tells the registry not to call collect() at registration.
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            f"{PREFIX}_state_database_up",
            "1 when the state database answered the last scrape's queries, else 0.",
        )
        try:
            with self._lock:
                families = list(self._current()) + list(self._finished_families())
        except Exception as exc:
            LOGGER.warning("metrics: state database query failed: %s: %s", type(exc).__name__, exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families

    # -- gauges: current state -----------------------------------------------------------------

    def _current(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from sqlalchemy import func, literal_column, select

        from dicom_node.state import Delivery, Job, JobState, Outbox, utcnow

        waiting = (JobState.WAITING.value, JobState.QUEUED.value)
        with self.db.session() as s:
            by_state = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            # NULL: a job from before 0004. A literal, not a parameter: PostgreSQL must see
            # the same expression in SELECT and GROUP BY.
            priority = func.coalesce(Job.priority, literal_column("'routine'"))
            by_queue = s.execute(
                select(Job.queue, priority, func.count(), func.min(Job.created_at))
                .where(Job.state.in_(waiting))
                .group_by(Job.queue, priority)
            ).all()
            outbox = s.scalar(select(func.count()).select_from(Outbox)) or 0
            deliveries = s.execute(
                select(
                    Delivery.destination,
                    Delivery.state,
                    func.count(),
                    func.coalesce(func.sum(Delivery.attempts), 0),
                ).group_by(Delivery.destination, Delivery.state)
            ).all()
        now = utcnow()

        jobs = GaugeMetricFamily(
            f"{PREFIX}_jobs", "Jobs in the state database by state.", labels=["state"]
        )
        for st in JobState:
            jobs.add_metric([st.value], float(by_state.get(st.value, 0)))
        yield jobs

        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_depth",
            "Jobs waiting for a worker (not yet dispatched, or dispatched and not started), by queue "
            "and priority.",
            labels=["queue", "priority"],
        )
        oldest = GaugeMetricFamily(
            f"{PREFIX}_queue_oldest_job_age_seconds",
            "Age of the oldest job waiting for a worker, by queue and priority.",
            labels=["queue", "priority"],
        )
        for queue, prio, count, first in by_queue:
            depth.add_metric([queue, prio], float(count))
            if first is not None:
                oldest.add_metric([queue, prio], max(0.0, (now - first).total_seconds()))
        yield depth
        yield oldest
        yield GaugeMetricFamily(
            f"{PREFIX}_outbox_records",
            "Dispatch records not yet handed to the broker (a growing value: broker down).",
            value=float(outbox),
        )

        state_g = GaugeMetricFamily(
            f"{PREFIX}_deliveries",
            "Result deliveries by destination and state.",
            labels=["destination", "state"],
        )
        attempts_c = CounterMetricFamily(
            f"{PREFIX}_delivery_attempts",
            "Delivery attempts (STOW-RS or C-STORE of a job's results), by destination.",
            labels=["destination"],
        )
        failed_c = CounterMetricFamily(
            f"{PREFIX}_delivery_failures",
            "Delivery attempts that did not succeed, by destination.",
            labels=["destination"],
        )
        attempts: dict[str, int] = defaultdict(int)
        succeeded: dict[str, int] = defaultdict(int)
        for destination, st, count, tries in deliveries:
            state_g.add_metric([destination, st], float(count))
            attempts[destination] += int(tries)
            if st == "done":
                succeeded[destination] += int(count)
        for destination, tries in sorted(attempts.items()):
            attempts_c.add_metric([destination], float(tries))
            failed_c.add_metric([destination], float(max(0, tries - succeeded[destination])))
        yield state_g
        yield attempts_c
        yield failed_c
        yield from self._health(now)

    def _health(self, now: datetime) -> Iterator[Any]:
        """Gauges the alert rules watch (:mod:`dicom_node.alerts.health`)."""
        from prometheus_client.core import GaugeMetricFamily

        from dicom_node.alerts.health import (
            destination_health,
            free_bytes,
            oldest_waiting_by_priority,
            sqlite_path,
        )

        configured = self.settings.all_destinations() if self.settings is not None else {}
        with self.db.session() as s:
            health = destination_health(s, configured)
            ages = oldest_waiting_by_priority(s, now)

        up = GaugeMetricFamily(
            f"{PREFIX}_destination_up",
            "0 when the destination's latest probe failed or a delivery to it failed since its "
            "last success (see dicom_node.alerts.health), else 1.",
            labels=["destination"],
        )
        for name, ok in health.items():
            up.add_metric([name], 1.0 if ok else 0.0)
        yield up

        oldest = GaugeMetricFamily(
            f"{PREFIX}_oldest_waiting_job_age_seconds",
            "Age of the oldest job waiting for a worker (0 when none waits).",
            value=max(ages.values(), default=0.0),
        )
        yield oldest
        by_priority = GaugeMetricFamily(
            f"{PREFIX}_queue_age_seconds",
            "Age of the oldest job waiting for a worker, by priority (0 when none waits).",
            labels=["priority"],
        )
        for priority, age in ages.items():
            by_priority.add_metric([priority], age)
        yield by_priority

        from dicom_node.retention import metric_families

        yield from metric_families(self.db, PREFIX)
        if self.settings is None:
            return
        spool = free_bytes(self.settings.spool_dir)
        if spool is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_spool_free_bytes",
                "Free bytes on the file system of the spool.",
                value=float(spool),
            )
        db_file = sqlite_path(self.settings.resolved_database_url)
        db_free = free_bytes(db_file) if db_file is not None else None
        if db_free is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_database_free_bytes",
                "Free bytes on the file system of the SQLite state database (absent for "
                "PostgreSQL).",
                value=float(db_free),
            )

    # -- histograms and counters over finished jobs ---------------------------------------------

    def _read_finished(self) -> None:
        from sqlalchemy import select

        from dicom_node.state import Job
        from dicom_node.state.models import TERMINAL_STATES

        acc = self._finished
        q = select(
            Job.id,
            Job.model,
            Job.model_version,
            Job.state,
            Job.created_at,
            Job.finished_at,
            Job.timings,
            Job.summary["finding_count"].as_integer(),
        ).where(Job.state.in_([s.value for s in TERMINAL_STATES]), Job.finished_at.is_not(None))
        if acc.watermark is not None:
            q = q.where(Job.finished_at >= acc.watermark - FINISHED_LOOKBACK)
        newest = acc.watermark
        with self.db.session() as s:
            for job_id, model, version, state, created, finished, timings, findings in s.execute(q):
                if acc.seen.get(job_id) == finished:
                    continue
                acc.seen[job_id] = finished
                newest = finished if newest is None or finished > newest else newest
                key = (model, version or "")
                acc.versions[key] = max(acc.versions.get(key, finished), finished)
                self._observe(acc, key, state, created, finished, timings or {}, findings)
        acc.forget_old_versions()
        acc.watermark = newest
        if newest is not None:
            horizon = newest - FINISHED_LOOKBACK
            acc.seen = {k: v for k, v in acc.seen.items() if v >= horizon}

    @staticmethod
    def _observe(
        acc: _Finished,
        model: tuple[str, str],
        state: str,
        created: datetime | None,
        finished: datetime,
        timings: dict[str, Any],
        findings: int | None,
    ) -> None:
        acc.finished[(*model, state)] += 1
        for stage, seconds in timings.items():
            if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0:
                acc.stages.setdefault(stage, _Histogram(STAGE_BUCKETS)).observe(float(seconds))
        detect = timings.get("detect")
        if isinstance(detect, int | float) and detect >= 0:
            acc.inference.setdefault(model, _Histogram(STAGE_BUCKETS)).observe(float(detect))
        if created is not None:
            acc.turnaround.setdefault(model, _Histogram(TURNAROUND_BUCKETS)).observe(
                max(0.0, (finished - created).total_seconds())
            )
        if findings is not None:
            acc.results[(*model, "positive" if findings > 0 else "negative")] += 1

    def _finished_families(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        self._read_finished()
        acc = self._finished

        stages = HistogramMetricFamily(
            f"{PREFIX}_job_stage_duration_seconds",
            "Time spent per job stage (load, detect, encode, deliver) by finished jobs.",
            labels=["stage"],
        )
        for stage, h in sorted(acc.stages.items()):
            stages.add_metric([stage], h.buckets(), h.total)
        yield stages

        turnaround = HistogramMetricFamily(
            f"{PREFIX}_job_turnaround_seconds",
            "Time from job creation (study complete) to its terminal state, by model and version.",
            labels=["model", "version"],
        )
        for key, h in sorted(acc.turnaround.items()):
            turnaround.add_metric(list(key), h.buckets(), h.total)
        yield turnaround

        inference = HistogramMetricFamily(
            f"{PREFIX}_inference_duration_seconds",
            "Model inference (detect stage) time per job, by model and version.",
            labels=["model", "version"],
        )
        for key, h in sorted(acc.inference.items()):
            inference.add_metric(list(key), h.buckets(), h.total)
        yield inference

        finished = CounterMetricFamily(
            f"{PREFIX}_jobs_finished",
            "Jobs that reached a terminal state, by model, version and state.",
            labels=["model", "version", "state"],
        )
        for key3, count in sorted(acc.finished.items()):
            finished.add_metric(list(key3), float(count))
        yield finished

        results = CounterMetricFamily(
            f"{PREFIX}_model_results",
            "Finished model runs by result: positive (at least one finding) or negative, by "
            "model and version.",
            labels=["model", "version", "result"],
        )
        ratio = GaugeMetricFamily(
            f"{PREFIX}_model_positive_ratio",
            "Share of finished model runs with at least one finding, by model and version.",
            labels=["model", "version"],
        )
        versions = sorted({(m, v) for m, v, _ in acc.results})
        for model, version in versions:
            pos = acc.results.get((model, version, "positive"), 0)
            neg = acc.results.get((model, version, "negative"), 0)
            results.add_metric([model, version, "positive"], float(pos))
            results.add_metric([model, version, "negative"], float(neg))
            if pos + neg:
                ratio.add_metric([model, version], pos / (pos + neg))
        yield results
        yield ratio


# -- exposition ---------------------------------------------------------------------------------


def render(
    collector: StateCollector | None,
    *,
    receiver_dir: Path | None = None,
    this_process: bool = True,
) -> tuple[bytes, str]:
    """The ``/metrics`` body and its content type.

    Receiver metrics come from ``receiver_dir`` or this node run's multiprocess directory (every
    receiver process), else, with ``this_process``, from this process's own registry (tools and
    tests running the app in-process); then ``collector``'s metrics.
    """
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        REGISTRY,
        CollectorRegistry,
        generate_latest,
        multiprocess,
    )

    path = receiver_dir or multiprocess_dir()
    registry = CollectorRegistry()
    if path is not None and path.is_dir():
        with contextlib.suppress(OSError):
            forget_dead_processes(path)
        multiprocess.MultiProcessCollector(registry, path=str(path))
    elif this_process:
        registry.register(_Delegate(REGISTRY))
    if collector is not None:
        registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def live_run_dir(data_dir: Path) -> Path | None:
    """The metrics directory of the node running on ``data_dir`` now, if any."""
    for run in sorted(Path(data_dir).glob("metrics/run-*")):
        pid = run.name.removeprefix("run-")
        if pid.isdigit() and _pid_alive(int(pid)):
            return run
    return None


class _Delegate:
    """Collects another registry's metrics (the process default) into a per-request registry."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        yield from self.registry.collect()
