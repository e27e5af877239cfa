"""The job pipeline: claim -> load -> detect -> encode -> store -> deliver.

Everything a job does happens under its lease (``dicom_node.jobs``). Results are written to the
results directory and recorded before any delivery, so every resend is byte-identical, and their
UIDs are derived from the study, the input set and the model, so a re-run writes the same objects
again instead of a second copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dicom_node import audit
from dicom_node import jobs as jobstate
from dicom_node.errors import (
    DicomNodeError,
    JobError,
    NoInputError,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from dicom_node.logs import log_context
from dicom_node.phi import describe_exception
from dicom_node.state import Delivery, DeliveryState, Job, JobState, Output, Study, utcnow
from workers.runtime import WorkerRuntime
from workers.source import instance_refs, make_source, read_headers

LOGGER = logging.getLogger(__name__)

RETRY_DELAY_SECONDS = 15.0
"""Pause before a job that failed with an unexpected error runs again."""


# What each stage does, for failure reasons ("loading the study failed: ValueError").
_STAGE_WORDS = {
    "load": "loading the study",
    "detect": "running the model",
    "encode": "encoding the results",
    "deliver": "delivering the results",
}


@dataclass
class _Stages:
    timings: dict[str, float] = field(default_factory=dict)
    current: str | None = None
    """The stage that is running (left set when it raises, so a failure can name it)."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        self.current = name
        try:
            yield
            self.current = None
        finally:
            self.timings[name] = round(
                self.timings.get(name, 0.0) + time.perf_counter() - started, 4
            )


class LeaseLost(Exception):
    """Our lease was taken over (we were too slow or presumed dead): stop without side effects."""


class _Heartbeat:
    """Renews the lease every third of its length while the job runs."""

    def __init__(self, runtime: WorkerRuntime, job_id: str) -> None:
        self.runtime = runtime
        self.job_id = job_id
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id[:8]}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        lease = self.runtime.settings.worker.lease_seconds
        while not self._stop.wait(lease / 3):
            try:
                if not jobstate.renew(self.runtime.db, self.job_id, self.runtime.owner_id, lease):
                    self.lost.set()
                    return
            except Exception:
                LOGGER.warning("lease renewal failed (database unreachable?)")

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost()


class JobRunner:
    """Runs one job (or its delivery phase) for the Celery tasks."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.rt = runtime
        self.db = runtime.db
        self.settings = runtime.settings
        self.owner = runtime.owner_id

    # -- entry points ---------------------------------------------------------------------------

    def run(self, job_id: str) -> str:
        """Handle a ``run_job`` message. Returns what happened (for logs and tests)."""
        claim = jobstate.claim(self.db, job_id, self.owner, self.settings.worker.lease_seconds)
        study_key = jobstate.study_key_of(self.db, job_id)
        with log_context(study_key=study_key, job_id=job_id):
            if claim.outcome is jobstate.ClaimOutcome.EXHAUSTED:
                LOGGER.error("job failed: attempts exhausted")
                self._audit_state(
                    job_id,
                    study_key,
                    JobState.FAILED,
                    outcome="failure",
                    reason="attempts exhausted",
                )
                return "exhausted"
            if claim.outcome is not jobstate.ClaimOutcome.CLAIMED:
                LOGGER.info("job message dropped: %s", claim.outcome.value)
                return claim.outcome.value
            self._audit_state(
                job_id, study_key, JobState(claim.job_state or "running"), attempt=claim.attempt
            )
            with _Heartbeat(self.rt, job_id) as heartbeat:
                if claim.job_state == JobState.DELIVERING.value:
                    return self._deliver_phase(job_id, study_key, heartbeat)
                return self._run_claimed(job_id, study_key, claim.attempt, heartbeat)

    def deliver(self, job_id: str) -> str:
        """Handle a ``deliver`` message: retry the due deliveries of a delivering job."""
        claim = jobstate.claim(
            self.db,
            job_id,
            self.owner,
            self.settings.worker.lease_seconds,
            states=(JobState.DELIVERING.value,),
            count_attempt=False,
        )
        study_key = jobstate.study_key_of(self.db, job_id)
        with log_context(study_key=study_key, job_id=job_id):
            if claim.outcome is not jobstate.ClaimOutcome.CLAIMED:
                return claim.outcome.value
            if claim.job_state != JobState.DELIVERING.value:
                # A deliver message for a job that is not delivering (reset by retry): run it.
                with _Heartbeat(self.rt, job_id) as heartbeat:
                    return self._run_claimed(job_id, study_key, claim.attempt, heartbeat)
            with _Heartbeat(self.rt, job_id) as heartbeat:
                return self._deliver_phase(job_id, study_key, heartbeat)

    # -- the run --------------------------------------------------------------------------------

    def _run_claimed(
        self, job_id: str, study_key: str | None, attempt: int, heartbeat: _Heartbeat
    ) -> str:
        stages = _Stages()
        source = None
        try:
            with self.db.session() as s:
                job = s.get(Job, job_id)
                assert job is not None
                study = s.get(Study, job.study_id)
                assert study is not None
                model_name, series_uids = job.model, list(job.series_uids or [])
                study_uid, study_id, input_hash = study.study_instance_uid, study.id, job.input_hash
                created_at = job.created_at

            detector = self.rt.detector(model_name)
            info = detector.info
            jobstate.update_job(self.db, job_id, self.owner, model_version=info.version)

            with stages.stage("load"):
                refs = instance_refs(self.db, study_id, series_uids)
                source = make_source(self.settings, job_id, study_uid)
                files = source.fetch(refs)
                cap = self.settings.scp.max_decoded_bytes
                headers = {uid: read_headers(paths, limit=cap) for uid, paths in files.items()}
                from workers.selection import select_series

                selection = select_series(headers, detector.requirements)
                if selection.series_instance_uid is None:
                    raise NoInputError(selection.reason())
                chosen = selection.series_instance_uid
                from workers.volume import load_series

                volume = load_series(
                    files[chosen],
                    max_voxels=detector.requirements.max_voxels,
                    max_decoded_bytes=cap,
                )
            heartbeat.check()

            with stages.stage("detect"):
                result = detector.predict(volume)
            heartbeat.check()

            with stages.stage("encode"):
                from workers.results import EncodeOptions, JobContext, encode_results, write_results

                context = JobContext(
                    job_id=job_id,
                    study_instance_uid=study_uid,
                    input_hash=input_hash,
                    model=info,
                    content_datetime=created_at,
                    node_name=self.settings.node_name,
                    ae_title=self.settings.ae_title,
                )
                objects = encode_results(
                    volume, result, context, EncodeOptions(dciodvfy=self.settings.worker.dciodvfy)
                )
                out_dir = self.settings.results_dir / job_id
                paths = write_results(objects, out_dir)
                summary_path = out_dir / "summary.json"
                summary = {
                    **result.summary(),
                    "series_instance_uid": chosen,
                    "slices": volume.shape[0],
                    "source": source.name,
                    "selection": selection.reasons_by_series(),
                }
                _write_atomic(summary_path, json.dumps(summary, indent=2, sort_keys=True).encode())
            heartbeat.check()

            self._record_outputs(job_id, objects, paths, summary_path)
            destinations = self._job_destinations(job_id)
            ok = jobstate.update_job(
                self.db,
                job_id,
                self.owner,
                state=JobState.DELIVERING.value,
                summary=summary,
                timings=stages.timings,
            )
            if not ok:
                raise LeaseLost()
            self._ensure_deliveries(job_id, destinations)
            self._audit_state(job_id, study_key, JobState.DELIVERING, findings=len(result.findings))
            return self._deliver_phase(job_id, study_key, heartbeat, stages)
        except LeaseLost:
            LOGGER.warning("lease lost; another attempt owns the job now")
            return "lease-lost"
        except NoInputError as exc:
            self._finish(job_id, study_key, JobState.SKIPPED, str(exc), stages)
            return "skipped"
        except JobError as exc:
            # str(exc) is ours (patient-free); a library cause keeps its frames in the log line,
            # with its message withheld by the formatter.
            self._finish(job_id, study_key, JobState.FAILED, str(exc), stages, cause=exc.__cause__)
            return "failed"
        except DicomNodeError as exc:
            return self._unexpected(job_id, study_key, attempt, exc, stages)
        except Exception as exc:
            # The formatter withholds library exception messages (they may quote dataset
            # values) and keeps the frames.
            LOGGER.exception("job attempt %d failed unexpectedly", attempt)
            return self._unexpected(job_id, study_key, attempt, exc, stages)
        finally:
            if source is not None:
                source.cleanup()

    def _unexpected(
        self, job_id: str, study_key: str | None, attempt: int, exc: Exception, stages: _Stages
    ) -> str:
        reason = _failure_reason(exc, stages.current)
        with self.db.session() as s:
            job = s.get(Job, job_id)
            max_attempts = job.max_attempts if job else 1
        if attempt >= max_attempts:
            self._finish(
                job_id,
                study_key,
                JobState.FAILED,
                f"failed after {attempt} attempts: {reason}",
                stages,
            )
            return "failed"
        jobstate.release_for_retry(
            self.db, job_id, self.owner, f"attempt {attempt} failed: {reason}", RETRY_DELAY_SECONDS
        )
        self._audit_state(job_id, study_key, JobState.QUEUED, outcome="warning", reason=reason)
        return "retry"

    def _finish(
        self,
        job_id: str,
        study_key: str | None,
        state: JobState,
        reason: str | None,
        stages: _Stages | None = None,
        *,
        cause: BaseException | None = None,
        **extra: Any,
    ) -> None:
        values: dict[str, Any] = {}
        if stages is not None and stages.timings:
            with self.db.session() as s:
                job = s.get(Job, job_id)
                merged = dict(job.timings or {}) if job else {}
            merged.update(stages.timings)
            values["timings"] = merged
        if jobstate.finish(self.db, job_id, self.owner, state, reason, **values):
            level = logging.INFO if state in (JobState.DONE, JobState.SKIPPED) else logging.ERROR
            LOGGER.log(
                level, "job %s%s", state.value, f": {reason}" if reason else "", exc_info=cause
            )
            self._audit_state(
                job_id,
                study_key,
                state,
                outcome="success" if state in (JobState.DONE, JobState.SKIPPED) else "failure",
                reason=reason or "",
                **extra,
            )

    # -- outputs and deliveries -----------------------------------------------------------------

    def _record_outputs(
        self, job_id: str, objects: list[Any], paths: list[Path], summary_path: Path
    ) -> None:
        now = utcnow()
        results_root = self.settings.results_dir
        with self.db.session() as s:
            existing = {
                (o.kind, o.sop_instance_uid): o
                for o in s.scalars(select(Output).where(Output.job_id == job_id))
            }
            items: list[tuple[str, str | None, str | None, str | None, Path]] = [
                (obj.kind, obj.sop_class_uid, obj.sop_instance_uid, obj.series_instance_uid, path)
                for obj, path in zip(objects, paths, strict=True)
            ]
            items.append(("summary", None, None, None, summary_path))
            for kind, sop_class, sop_uid, series_uid, path in items:
                data = path.read_bytes()
                row = existing.get((kind, sop_uid))
                rel = str(path.relative_to(results_root))
                digest = hashlib.sha256(data).hexdigest()
                if row is None:
                    s.add(
                        Output(
                            job_id=job_id,
                            kind=kind,
                            sop_class_uid=sop_class,
                            sop_instance_uid=sop_uid,
                            series_instance_uid=series_uid,
                            path=rel,
                            size=len(data),
                            sha256=digest,
                            created_at=now,
                        )
                    )
                else:
                    row.path, row.size, row.sha256 = rel, len(data), digest

    def _job_destinations(self, job_id: str) -> list[str]:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            return list(job.destinations or []) if job else []

    def _ensure_deliveries(self, job_id: str, destinations: list[str]) -> None:
        with self.db.session() as s:
            have = {
                d.destination for d in s.scalars(select(Delivery).where(Delivery.job_id == job_id))
            }
            for name in destinations:
                if name not in have:
                    s.add(
                        Delivery(
                            job_id=job_id,
                            destination=name,
                            state=DeliveryState.PENDING.value,
                            attempts=0,
                        )
                    )

    def _deliver_phase(
        self,
        job_id: str,
        study_key: str | None,
        heartbeat: _Heartbeat,
        stages: _Stages | None = None,
    ) -> str:
        stages = stages or _Stages()
        from dicom_node.delivery import build_destination, deliver, next_delay

        configured = self.settings.all_destinations()
        with self.db.session() as s:
            outputs = [
                self.settings.results_dir / o.path
                for o in s.scalars(
                    select(Output).where(Output.job_id == job_id).order_by(Output.id)
                )
                if o.kind != "summary"
            ]
            deliveries = [
                (d.id, d.destination, d.attempts, d.next_attempt_at)
                for d in s.scalars(select(Delivery).where(Delivery.job_id == job_id))
                if d.state in (DeliveryState.PENDING.value, DeliveryState.RETRY.value)
            ]
        now = utcnow()
        with stages.stage("deliver"):
            for delivery_id, name, attempts, due in deliveries:
                heartbeat.check()
                if due is not None and due > now:
                    continue
                cfg = configured.get(name)
                if cfg is None:
                    self._delivery_update(
                        delivery_id,
                        DeliveryState.FAILED,
                        attempts,
                        f"destination {name!r} is no longer configured",
                    )
                    continue
                attempts += 1
                try:
                    if outputs:
                        deliver(
                            build_destination(name, cfg, calling_ae_title=self.settings.ae_title),
                            outputs,
                            verify=cfg.read_back,
                        )
                except TransientDeliveryError as exc:
                    if attempts >= cfg.max_attempts:
                        self._delivery_update(
                            delivery_id,
                            DeliveryState.FAILED,
                            attempts,
                            f"gave up after {attempts} attempts: {exc}",
                        )
                    else:
                        delay = next_delay(attempts, cfg.backoff_initial, cfg.backoff_max)
                        self._delivery_update(
                            delivery_id,
                            DeliveryState.RETRY,
                            attempts,
                            str(exc),
                            next_attempt=utcnow() + timedelta(seconds=delay),
                        )
                        LOGGER.warning(
                            "delivery to %s failed (attempt %d), retry in %.0f s: %s",
                            name,
                            attempts,
                            delay,
                            exc,
                        )
                    continue
                except PermanentDeliveryError as exc:
                    self._delivery_update(delivery_id, DeliveryState.FAILED, attempts, str(exc))
                    audit.record(
                        self.db,
                        audit.DELIVERY_FAILED,
                        actor=self.owner,
                        outcome="failure",
                        study_key=study_key,
                        job_id=job_id,
                        destination=name,
                        reason=str(exc),
                    )
                    continue
                self._delivery_update(
                    delivery_id, DeliveryState.DONE, attempts, None, delivered=True
                )
                audit.record(
                    self.db,
                    audit.RESULT_DELIVERED,
                    actor=self.owner,
                    study_key=study_key,
                    job_id=job_id,
                    destination=name,
                    objects=len(outputs),
                )
        return self._settle(job_id, study_key, stages)

    def _delivery_update(
        self,
        delivery_id: int,
        state: DeliveryState,
        attempts: int,
        error: str | None,
        *,
        next_attempt: Any = None,
        delivered: bool = False,
    ) -> None:
        with self.db.session() as s:
            d = s.get(Delivery, delivery_id)
            if d is None:
                return
            d.state = state.value
            d.attempts = attempts
            d.last_error = error
            d.next_attempt_at = next_attempt
            if delivered:
                d.delivered_at = utcnow()

    def _settle(self, job_id: str, study_key: str | None, stages: _Stages) -> str:
        with self.db.session() as s:
            states = [
                (d.destination, d.state, d.next_attempt_at, d.last_error)
                for d in s.scalars(select(Delivery).where(Delivery.job_id == job_id))
            ]
        waiting = [
            due
            for _, st, due, _ in states
            if st in (DeliveryState.RETRY.value, DeliveryState.PENDING.value)
        ]
        failed = [(name, err) for name, st, _, err in states if st == DeliveryState.FAILED.value]
        if waiting:
            due = min((d for d in waiting if d is not None), default=utcnow())
            self._merge_timings(job_id, stages)
            jobstate.park_for_delivery(self.db, job_id, self.owner, due)
            return "delivering"
        if failed:
            reason = "; ".join(f"delivery to {n} failed: {e}" for n, e in failed)
            self._finish(job_id, study_key, JobState.FAILED, reason, stages)
            return "failed"
        self._finish(job_id, study_key, JobState.DONE, None, stages)
        return "done"

    def _merge_timings(self, job_id: str, stages: _Stages) -> None:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is not None:
                merged = dict(job.timings or {})
                merged.update(stages.timings)
                job.timings = merged

    def _audit_state(
        self,
        job_id: str,
        study_key: str | None,
        state: JobState,
        *,
        outcome: str = "success",
        **detail: Any,
    ) -> None:
        audit.record(
            self.db,
            audit.JOB_STATE,
            actor=self.owner,
            outcome=outcome,
            study_key=study_key,
            job_id=job_id,
            state=state.value,
            **detail,
        )


def _failure_reason(exc: BaseException, stage: str | None) -> str:
    """A patient-free reason: the stage and the exception type (with the message only for the
    node's own errors; a library's message may quote a dataset value)."""
    described = describe_exception(exc)
    if not isinstance(exc, DicomNodeError):
        where = _STAGE_WORDS.get(stage or "", "the job")
        return f"{where} failed: {described}"
    return _first_line(described)


def _first_line(text: str, limit: int = 200) -> str:
    return (text.strip().splitlines() or [""])[0][:limit]


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)
