"""The delivery phase of a job: send its stored results to each destination, with retries.

Runs from the ``delivery`` queue, consumed where the central result store is (the node's own
worker, see ``docs/deployment.md``), never on the machine that ran the model: a retry days later
still finds the results after that machine is gone. Each round claims the job under a lease
(:func:`dicom_node.jobs.claim` with ``delivery=True``), tries every delivery that is due, records
each attempt through the job core, and then settles the job: parked until the next attempt is
due, failed, or done.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

from dicom_node import audit, jobs
from dicom_node.delivery.backoff import next_delay
from dicom_node.delivery.destinations import build_destination
from dicom_node.delivery.outputs import sends
from dicom_node.delivery.withdraw import delete_superseded
from dicom_node.delivery.writeback import deliver
from dicom_node.errors import PermanentDeliveryError, TransientDeliveryError
from dicom_node.logs import log_context
from dicom_node.results_store import ResultMissingError, ResultStore
from dicom_node.settings import Settings
from dicom_node.state import Database, DeliveryState, JobState, utcnow

LOGGER = logging.getLogger(__name__)


class DeliveryPhase:
    """Delivers jobs' results for one worker process (``owner`` is its lease owner id)."""

    def __init__(self, db: Database, settings: Settings, owner: str) -> None:
        self.db = db
        self.settings = settings
        self.owner = owner
        self.store = ResultStore(settings.results_dir)

    def run(self, job_id: str) -> str:
        """Handle a ``deliver`` message. Returns what happened (for logs and tests)."""
        lease_seconds = self.settings.worker.lease_seconds
        claim = jobs.claim(self.db, job_id, self.owner, lease_seconds, delivery=True)
        study_key = jobs.study_key_of(self.db, job_id)
        with log_context(study_key=study_key, job_id=job_id):
            if claim.outcome is not jobs.ClaimOutcome.CLAIMED:
                LOGGER.info("delivery message dropped: %s", claim.outcome.value)
                return claim.outcome.value
            with jobs.Lease(self.db, job_id, self.owner, lease_seconds) as lease:
                return self.run_held(job_id, study_key, lease)

    def run_held(self, job_id: str, study_key: str | None, lease: jobs.Lease) -> str:
        """Deliver a job whose lease the caller already holds in ``delivering`` (the worker that
        just recorded its results, sharing the store)."""
        try:
            return self._deliver(job_id, study_key, lease)
        except jobs.LeaseLost:
            LOGGER.warning("lease lost; another attempt owns the job now")
            return "lease-lost"

    def _outputs(self, job_id: str) -> list[tuple[str, Path]]:
        """(kind, verified file) of each result object of the job, in the order recorded."""
        return [
            (o.kind, self.store.verified(o.path, o.size, o.sha256))
            for o in jobs.outputs_of(self.db, job_id)
            if o.kind != "summary"
        ]

    def _deliver(self, job_id: str, study_key: str | None, lease: jobs.Lease) -> str:
        started = utcnow()
        try:
            outputs = self._outputs(job_id)
        except ResultMissingError as exc:
            # Results recorded by a worker that wrote them somewhere this host cannot see (or
            # lost since): run the model again; deterministic UIDs make the new files the same.
            reason = f"{exc}; running the model again to recreate it"
            LOGGER.warning("%s", reason)
            if not jobs.rerun_for_missing_results(self.db, job_id, self.owner, reason):
                raise jobs.LeaseLost() from None
            self._audit(job_id, study_key, JobState.QUEUED, outcome="warning", reason=reason)
            return "rerun"
        configured = self.settings.all_destinations()
        # Withdrawn by deletion where a destination asks for that (supersede = "delete"); the
        # rejection note (kind "kos") is sent only where it asks for that (the default), and
        # every other object only where the destination's ``outputs`` name it.
        superseded: tuple[jobs.ResultRef, ...] | None = None
        now = utcnow()
        for todo in jobs.open_deliveries(self.db, job_id):
            lease.check()
            if todo.next_attempt_at is not None and todo.next_attempt_at > now:
                continue
            cfg = configured.get(todo.destination)
            if cfg is None:
                self._record(
                    job_id,
                    todo.id,
                    DeliveryState.FAILED,
                    todo.attempts,
                    f"destination {todo.destination!r} is no longer configured",
                )
                continue
            attempts = todo.attempts + 1
            files = [path for kind, path in outputs if sends(cfg, kind)]
            withdrawn = 0
            try:
                if files:
                    destination = build_destination(
                        todo.destination, cfg, calling_ae_title=self.settings.ae_title
                    )
                    deliver(destination, files, verify=cfg.read_back)
                if cfg.supersede == "delete":
                    if superseded is None:
                        superseded = jobs.result_lineage(self.db, job_id).superseded
                    if superseded:
                        # After the new version is there (never a moment with no result).
                        withdrawn = delete_superseded(todo.destination, cfg, superseded)
            except TransientDeliveryError as exc:
                if attempts >= cfg.max_attempts:
                    self._record(
                        job_id,
                        todo.id,
                        DeliveryState.FAILED,
                        attempts,
                        f"gave up after {attempts} attempts: {exc}",
                    )
                    continue
                delay = next_delay(attempts, cfg.backoff_initial, cfg.backoff_max)
                self._record(
                    job_id,
                    todo.id,
                    DeliveryState.RETRY,
                    attempts,
                    str(exc),
                    next_attempt=utcnow() + timedelta(seconds=delay),
                )
                LOGGER.warning(
                    "delivery to %s failed (attempt %d), retry in %.0f s: %s",
                    todo.destination,
                    attempts,
                    delay,
                    exc,
                )
                continue
            except PermanentDeliveryError as exc:
                self._record(job_id, todo.id, DeliveryState.FAILED, attempts, str(exc))
                audit.record(
                    self.db,
                    audit.DELIVERY_FAILED,
                    actor=self.owner,
                    outcome="failure",
                    study_key=study_key,
                    job_id=job_id,
                    destination=todo.destination,
                    reason=str(exc),
                )
                continue
            self._record(job_id, todo.id, DeliveryState.DONE, attempts)
            audit.record(
                self.db,
                audit.RESULT_DELIVERED,
                actor=self.owner,
                study_key=study_key,
                job_id=job_id,
                destination=todo.destination,
                objects=len(files),
                supersede=cfg.supersede,
                **({"deleted": str(withdrawn)} if cfg.supersede == "delete" else {}),
            )
        seconds = (utcnow() - started).total_seconds()
        return self._settle(job_id, study_key, seconds)

    def _record(
        self,
        job_id: str,
        delivery_id: int,
        state: DeliveryState,
        attempts: int,
        error: str | None = None,
        *,
        next_attempt: datetime | None = None,
    ) -> None:
        if not jobs.record_attempt(
            self.db,
            job_id,
            self.owner,
            delivery_id,
            state,
            attempts,
            error,
            next_attempt=next_attempt,
        ):
            raise jobs.LeaseLost()

    def _settle(self, job_id: str, study_key: str | None, seconds: float) -> str:
        states = jobs.delivery_status(self.db, job_id)
        timings = {"deliver": round(seconds, 4)}
        waiting = [
            d.next_attempt_at
            for d in states
            if d.state in (DeliveryState.RETRY.value, DeliveryState.PENDING.value)
        ]
        failed = [d for d in states if d.state == DeliveryState.FAILED.value]
        if waiting:
            due = min((d for d in waiting if d is not None), default=utcnow())
            if not jobs.park_for_delivery(self.db, job_id, self.owner, due, timings=timings):
                raise jobs.LeaseLost()
            return "delivering"
        if failed:
            reason = "; ".join(
                f"delivery to {d.destination} failed: {d.last_error}" for d in failed
            )
            self._finish(job_id, study_key, JobState.FAILED, reason, timings)
            return "failed"
        self._finish(job_id, study_key, JobState.DONE, None, timings)
        return "done"

    def _finish(
        self,
        job_id: str,
        study_key: str | None,
        state: JobState,
        reason: str | None,
        timings: dict[str, float],
    ) -> None:
        if not jobs.finish(self.db, job_id, self.owner, state, reason, timings=timings):
            raise jobs.LeaseLost()
        level = logging.INFO if state is JobState.DONE else logging.ERROR
        LOGGER.log(level, "job %s%s", state.value, f": {reason}" if reason else "")
        self._audit(
            job_id,
            study_key,
            state,
            outcome="success" if state is JobState.DONE else "failure",
            reason=reason or "",
        )

    def _audit(
        self, job_id: str, study_key: str | None, state: JobState, *, outcome: str, **detail: str
    ) -> None:
        audit.job_state(
            self.db, job_id, study_key, state.value, actor=self.owner, outcome=outcome, **detail
        )
