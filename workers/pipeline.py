"""The model phase of a job: claim -> load -> detect -> encode -> store -> record.

Everything a job does happens under its lease (:mod:`dicom_node.jobs`). The results are put in
the central result store (:mod:`dicom_node.results_store`; over the node's API when this worker
runs on another machine) and recorded before the job counts as encoded; their UIDs are derived
from the study, the input set and the model, so a re-run writes the same objects again instead of
a second copy. Delivery is a separate phase on the ``delivery`` queue, run where the store is
(:mod:`dicom_node.delivery.phase`), so it never depends on this machine staying up.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from dicom_node import audit
from dicom_node import jobs as jobstate
from dicom_node.errors import (
    DicomNodeError,
    JobError,
    NoInputError,
)
from dicom_node.jobs import LeaseLost
from dicom_node.logs import log_context
from dicom_node.phi import describe_exception
from dicom_node.state import Job, JobState, Study
from workers.runtime import WorkerRuntime
from workers.source import instance_refs, make_source, read_headers
from workers.storage import store_outputs

LOGGER = logging.getLogger(__name__)

RETRY_DELAY_SECONDS = 15.0
"""Pause before a job that failed with an unexpected error runs again."""


# What each stage does, for failure reasons ("loading the study failed: ValueError").
_STAGE_WORDS = {
    "load": "loading the study",
    "detect": "running the model",
    "encode": "encoding the results",
    "store": "storing the results",
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
            lease = jobstate.Lease(self.db, job_id, self.owner, self.settings.worker.lease_seconds)
            with lease:
                return self._run_claimed(job_id, study_key, claim.attempt, lease)

    # -- the run --------------------------------------------------------------------------------

    def _run_claimed(
        self, job_id: str, study_key: str | None, attempt: int, heartbeat: jobstate.Lease
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
                destinations = list(job.destinations or [])
                study_uid, study_id, input_hash = study.study_instance_uid, study.id, job.input_hash
                created_at, generation = job.created_at, job.generation

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
                from dicom_node.delivery.outputs import requested_kinds
                from workers.results import EncodeOptions, JobContext, encode_results

                # From the job's supersedes links, fixed when it was created: a re-run encodes
                # the same version and rejects the same earlier objects (unless the earlier
                # job only recorded its results in between).
                lineage = jobstate.result_lineage(self.db, job_id)
                context = JobContext(
                    job_id=job_id,
                    study_instance_uid=study_uid,
                    input_hash=input_hash,
                    model=info,
                    content_datetime=created_at,
                    node_name=self.settings.node_name,
                    ae_title=self.settings.ae_title,
                    result_version=lineage.version,
                    superseded=lineage.superseded,
                    generation=generation,
                )
                # What the job's destinations ask for beyond SR and SEG (``outputs``); each
                # destination is later sent only its own selection.
                options = EncodeOptions(
                    dciodvfy=self.settings.worker.dciodvfy,
                    extra_outputs=requested_kinds(self.settings, destinations),
                )
                objects = encode_results(volume, result, context, options)
                summary = {
                    **result.summary(),
                    "series_instance_uid": chosen,
                    "slices": volume.shape[0],
                    "source": source.name,
                    "selection": selection.reasons_by_series(),
                }
            heartbeat.check()

            with stages.stage("store"):
                records = store_outputs(self.settings, job_id, self.owner, objects, summary)
            recorded = jobstate.record_outputs(
                self.db,
                job_id,
                self.owner,
                records,
                summary=summary,
                timings=stages.timings,
                lease_seconds=self.settings.worker.lease_seconds if self.rt.delivers else None,
            )
            if recorded is jobstate.Recorded.LEASE_LOST:
                raise LeaseLost()
            state = JobState.DONE if recorded is jobstate.Recorded.DONE else JobState.DELIVERING
            self._audit_state(job_id, study_key, state, findings=len(result.findings))
            if state is JobState.DELIVERING and self.rt.delivers:
                # This worker shares the result store and consumes `delivery`: deliver now rather
                # than queueing the delivery behind the next job's run.
                from dicom_node.delivery.phase import DeliveryPhase

                phase = DeliveryPhase(self.db, self.settings, self.owner)
                return phase.run_held(job_id, study_key, heartbeat)
            return recorded.value
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
            self.db,
            job_id,
            self.owner,
            f"attempt {attempt} failed: {reason}",
            RETRY_DELAY_SECONDS,
            timings=stages.timings,
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
        timings = stages.timings if stages is not None else None
        if jobstate.finish(self.db, job_id, self.owner, state, reason, timings=timings):
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

    def _audit_state(
        self,
        job_id: str,
        study_key: str | None,
        state: JobState,
        *,
        outcome: str = "success",
        **detail: Any,
    ) -> None:
        audit.job_state(
            self.db, job_id, study_key, state.value, actor=self.owner, outcome=outcome, **detail
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
