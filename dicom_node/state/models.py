"""Tables of the state database: the source of truth for what arrived and what was done.

The index is patient-free: it holds UIDs (needed to find and reference instances), opaque keys,
sizes, transfer syntaxes and routing attributes, never names, IDs or birth dates (accession
number and patient ID only as keyed hashes, for lookup: dicom_node.study_lookup).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the state database; use utcnow()")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only clock the state database accepts)."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class JobState(str, Enum):
    """A job's life: waiting -> queued -> running -> delivering -> done | failed | skipped."""

    WAITING = "waiting"  # created, dispatch record not yet sent
    QUEUED = "queued"  # Celery message sent
    RUNNING = "running"  # claimed by a worker under a lease
    DELIVERING = "delivering"  # results stored; write-back in progress or waiting to retry
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.SKIPPED, JobState.CANCELLED})


class DeliveryState(str, Enum):
    PENDING = "pending"
    RETRY = "retry"  # failed transiently; next_attempt_at says when
    DONE = "done"
    FAILED = "failed"


class Meta(Base):
    """Installation-wide values (the UID hashing salt).

    The schema revision is kept by Alembic in its own table (see dicom_node.state.migrations);
    a change to any table here needs a revision there.
    """

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_key: Mapped[str] = mapped_column(String(32), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # Completion timer, kept here so a restart during the quiet period still creates the job:
    # a study is "dirty" while it has instances no job has seen yet.
    dirty: Mapped[bool] = mapped_column(Boolean, default=True)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    """Number of times the study has been completed (job versions)."""
    calling_ae_title: Mapped[str | None] = mapped_column(String(16), nullable=True)
    source: Mapped[str] = mapped_column(String(16), default="dimse")
    accession_number_hmac: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """Keyed hash of the Accession Number, for lookup only (dicom_node.study_lookup); NULL for
    studies indexed before revision 0003 or received without one."""
    patient_id_hmac: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """Keyed hash of the Patient ID, for lookup only (dicom_node.study_lookup)."""

    series: Mapped[list[Series]] = relationship(back_populates="study")

    __table_args__ = (
        Index("ix_studies_dirty_last", "dirty", "last_received_at"),
        Index("ix_studies_accession_number_hmac", "accession_number_hmac"),
        Index("ix_studies_patient_id_hmac", "patient_id_hmac"),
    )


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    series_key: Mapped[str] = mapped_column(String(32), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    body_part: Mapped[str | None] = mapped_column(String(64), nullable=True)
    series_description: Mapped[str | None] = mapped_column(String(64), nullable=True)
    study_description: Mapped[str | None] = mapped_column(String(64), nullable=True)
    manufacturer: Mapped[str | None] = mapped_column(String(64), nullable=True)
    slice_thickness: Mapped[float | None] = mapped_column(Float, nullable=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")

    __table_args__ = (Index("ix_series_study", "study_id"),)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(255))
    """Relative to the spool directory; built only from opaque keys."""
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16), nullable=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    source: Mapped[str] = mapped_column(String(16), default="dimse")
    number_of_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    """When retention removed the spool file (the row stays); NULL while the file is kept."""

    series: Mapped[Series] = relationship(back_populates="instances")

    __table_args__ = (
        Index("ix_instances_study", "study_id"),
        Index("ix_instances_series", "series_id"),
    )


class DuplicateEvent(Base):
    """A SOP instance that arrived again. ``identical`` says whether the bytes matched."""

    __tablename__ = "duplicate_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    identical: Mapped[bool] = mapped_column(Boolean)
    action: Mapped[str] = mapped_column(String(16))  # ignored | kept-first | overwritten | rejected | restored
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16), nullable=True)


class Job(Base):
    """One model run over one version of a study's input set."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    """Deterministic: derived from study, input set, rule, model and generation (see
    dicom_node.jobs)."""
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    study_version: Mapped[int] = mapped_column(Integer)
    rule: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    queue: Mapped[str] = mapped_column(String(64), default="cpu")
    state: Mapped[str] = mapped_column(String(16), default=JobState.WAITING.value)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Why a job failed or was skipped (patient-free)."""
    input_hash: Mapped[str] = mapped_column(String(64))
    input_count: Mapped[int] = mapped_column(Integer, default=0)
    series_uids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    """Series the rule selected for the model."""
    destinations: Mapped[list[Any]] = mapped_column(JSON, default=list)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Seconds per stage (load, detect, encode, deliver...) of the last attempt."""
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Patient-free result summary (finding count, per-finding label/confidence/size)."""
    supersedes_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    """The job of the previous version of this study for the same rule and model."""
    dispatch_count: Mapped[int] = mapped_column(Integer, default=0)
    priority: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """``stat``, ``routine`` or ``research`` (the routing rule's); NULL (jobs made before
    revision 0004) counts as ``routine``."""
    generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """0 for the job routing made when the study completed; 1, 2, ... for each re-run of the
    same input set, rule and model (a new model version: :func:`dicom_node.completion.rerun_study`),
    each superseding the one before."""

    outputs: Mapped[list[Output]] = relationship(back_populates="job", order_by="Output.id")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job", order_by="Delivery.id")

    __table_args__ = (
        UniqueConstraint(
            "study_id", "input_hash", "rule", "model", "generation", name="uq_job_input"
        ),
        Index("ix_jobs_state", "state"),
    )


class Outbox(Base):
    """Dispatch records: written in the same transaction as the job state change that needs a
    Celery message, removed once the message is sent."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    task: Mapped[str] = mapped_column(String(64))
    queue: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (Index("ix_outbox_job", "job_id"),)


class Output(Base):
    """A result object stored before it is sent, so every resend is byte-identical."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # seg | sr | preview | summary
    sop_class_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    path: Mapped[str] = mapped_column(String(255))
    """Relative to the results directory."""
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    """When retention removed the result file (the row stays); NULL while the file is kept."""

    job: Mapped[Job] = relationship(back_populates="outputs")

    __table_args__ = (UniqueConstraint("job_id", "kind", "sop_instance_uid", name="uq_output"),)


class Delivery(Base):
    """Write-back of a job's outputs to one destination, with its own state and retries."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    job: Mapped[Job] = relationship(back_populates="deliveries")

    __table_args__ = (UniqueConstraint("job_id", "destination", name="uq_delivery"),)


class AuditEvent(Base):
    """Append-only audit trail: who did what, when, with which outcome. Patient-free."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    event: Mapped[str] = mapped_column(String(48))
    actor: Mapped[str | None] = mapped_column(String(128), nullable=True)
    """Calling AE title and host, HTTP user, worker id or 'node'."""
    outcome: Mapped[str] = mapped_column(String(16))  # success | failure | warning
    study_key: Mapped[str | None] = mapped_column(String(32), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ModelVersion(Base):
    """What a worker can run: one row per model and worker, written by the worker when it
    starts and when it loads a model (``workers/celery_app.py``, ``workers/runtime.py``), read
    by the edge to know a model's current version (:mod:`dicom_node.state.model_versions`)."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(32))
    weights_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    worker: Mapped[str] = mapped_column(String(128))
    """The worker's name (``--name``, default the host name): no patient data."""
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (UniqueConstraint("model", "worker", name="uq_model_version_worker"),)


class ProbeResult(Base):
    """One check of a destination (C-ECHO or QIDO-RS): the recent history per destination,
    bounded by ``probes.history`` (:mod:`dicom_node.delivery.probe`)."""

    __tablename__ = "probe_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    ok: Mapped[bool] = mapped_column(Boolean)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Why the destination is down (no credentials, no patient data)."""

    __table_args__ = (Index("ix_probe_results_destination_at", "destination", "at"),)
